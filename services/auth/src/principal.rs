//! Who is calling, and what they may touch.

use std::{fmt, str::FromStr};

use betting_domain::{ErrorCode, ErrorReason, ServiceError, UserId};

/// What a token allows. `backend` was split by what each caller may do (a
/// game server's token cannot withdraw money; a settler's cannot deposit):
/// see the authorization matrix in ARCHITECTURE.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A game client: only its own wallet and bets.
    Player,
    /// Our own processes (betting, settler): HoldStake, RefundStake,
    /// PayWinnings, and reading any wallet.
    Service,
    /// A game server: opens, closes, settles and voids rounds.
    Game,
    /// The payments desk: deposits and withdrawals, and reading any wallet and ledger.
    Cashier,
    /// Operators: the audit, and reading anything; no money movement.
    Admin,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Player,
        Role::Service,
        Role::Game,
        Role::Cashier,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Player => "player",
            Role::Service => "service",
            Role::Game => "game",
            Role::Cashier => "cashier",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The role every token of an earlier version carried; refused by name.
pub const RETIRED_BACKEND_ROLE: &str = "backend";

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(role) = Role::ALL.into_iter().find(|r| r.as_str() == s) {
            return Ok(role);
        }
        if s == RETIRED_BACKEND_ROLE {
            return Err(
                "the backend role was split into service, game, cashier and admin: use the one you need"
                    .into(),
            );
        }
        Err(format!(
            "unknown role {s:?}: expected player, service, game, cashier or admin"
        ))
    }
}

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The player's user id; `None` for every other role (their tokens
    /// name a caller, not a wallet).
    pub user_id: Option<UserId>,
    pub role: Role,
    /// The token's `sub`: who did it, for the privileged-action trail (a
    /// player's user id, or the name of a service, game server or operator).
    pub subject: String,
    /// When the token expires (seconds since the epoch): long-lived streams end then.
    pub expires_at: Option<u64>,
}

/// The roles a refusal names, as text.
fn role_list(roles: &[Role]) -> String {
    let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    names.join(" or ")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required")]
    Unauthenticated,
    /// The bearer token was missing, malformed, forged or expired.
    #[error(transparent)]
    Token(#[from] crate::TokenError),
    /// We could not mint our own service token: a bug or a broken key.
    #[error("cannot mint a service token")]
    Credentials,
    /// The caller's role may not call this operation.
    #[error("this operation needs the {} role", role_list(.0))]
    RoleRequired(&'static [Role]),
    #[error("players may only act on their own account")]
    OtherUser,
    #[error("user_id is required: this token names no user")]
    NoUser,
}

impl ServiceError for AuthError {
    fn code(&self) -> ErrorCode {
        match self {
            AuthError::Unauthenticated | AuthError::Token(_) => ErrorCode::Unauthenticated,
            AuthError::Credentials => ErrorCode::Internal,
            AuthError::NoUser => ErrorCode::InvalidArgument,
            AuthError::RoleRequired(_) | AuthError::OtherUser => ErrorCode::PermissionDenied,
        }
    }

    fn reason(&self) -> ErrorReason {
        match self {
            AuthError::Unauthenticated | AuthError::Token(_) => ErrorReason::Unauthenticated,
            AuthError::Credentials => ErrorReason::Internal,
            AuthError::RoleRequired(_) => ErrorReason::RoleRequired,
            AuthError::OtherUser => ErrorReason::OtherUser,
            AuthError::NoUser => ErrorReason::UserRequired,
        }
    }

    fn violations(&self) -> Vec<betting_domain::FieldViolation> {
        match self {
            AuthError::NoUser => vec![betting_domain::FieldViolation::new(
                "user_id",
                "is required when the token names no user",
            )],
            _ => Vec::new(),
        }
    }
}

impl Principal {
    /// A player, as its token names it.
    pub fn player(user: UserId, expires_at: Option<u64>) -> Self {
        Self {
            user_id: Some(user),
            role: Role::Player,
            subject: user.get().to_string(),
            expires_at,
        }
    }

    /// A caller of a role other than player, named `subject`.
    pub fn named(role: Role, subject: impl Into<String>, expires_at: Option<u64>) -> Self {
        Self {
            user_id: None,
            role,
            subject: subject.into(),
            expires_at,
        }
    }

    /// The principal the interceptor attached to a request.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<&Principal, AuthError> {
        request
            .extensions()
            .get::<Principal>()
            .ok_or(AuthError::Unauthenticated)
    }

    /// The caller of a request, as every handler starts: the principal the
    /// interceptor attached, or the status that refuses the call.
    pub fn caller<T>(request: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
        Self::of(request)
            .cloned()
            .map_err(|e| betting_api::to_status(&e))
    }

    /// One of `roles` only. Each operation names its roles where it is
    /// defined, so the matrix in ARCHITECTURE.md can be read off the code.
    pub fn require(&self, roles: &'static [Role]) -> Result<(), AuthError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            Err(AuthError::RoleRequired(roles))
        }
    }

    /// A player acting for itself: its own user id. Other roles are refused
    /// (they have no wallet or bets of their own).
    pub fn own_player(&self) -> Result<UserId, AuthError> {
        self.require(&[Role::Player])?;
        self.own_user()
    }

    /// The caller's own user id.
    pub fn own_user(&self) -> Result<UserId, AuthError> {
        self.user_id.ok_or(AuthError::NoUser)
    }

    /// Resolves a `user_id` request field: a player gets only itself (0 means
    /// the caller); the roles in `others` may name any user; everyone else is
    /// refused.
    pub fn resolve_user(
        &self,
        requested: i64,
        others: &'static [Role],
    ) -> Result<UserId, AuthError> {
        if self.role == Role::Player {
            let own = self.own_user()?;
            return if requested == 0 || requested == own.get() {
                Ok(own)
            } else {
                Err(AuthError::OtherUser)
            };
        }
        self.require(others)?;
        if requested == 0 {
            return self.own_user();
        }
        UserId::new(requested).map_err(|_| AuthError::NoUser)
    }

    /// Whether the caller may see data that belongs to `owner`: the owner,
    /// or one of `others`.
    pub fn can_see(&self, owner: UserId, others: &[Role]) -> bool {
        others.contains(&self.role) || (self.role == Role::Player && self.user_id == Some(owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn player(id: i64) -> Principal {
        Principal::player(UserId::new(id).expect("id"), None)
    }

    const READERS: &[Role] = &[Role::Cashier, Role::Admin];

    #[test]
    fn players_resolve_only_themselves() {
        let p = player(7);
        assert_eq!(p.resolve_user(0, READERS).map(UserId::get), Ok(7));
        assert_eq!(p.resolve_user(7, READERS).map(UserId::get), Ok(7));
        assert_eq!(p.resolve_user(8, READERS), Err(AuthError::OtherUser));
        assert_eq!(
            p.require(&[Role::Cashier]),
            Err(AuthError::RoleRequired(&[Role::Cashier]))
        );
        assert!(p.can_see(UserId::new(7).expect("id"), &[]));
        assert!(!p.can_see(UserId::new(8).expect("id"), &[]));
    }

    #[test]
    fn named_roles_resolve_anyone_only_when_listed() {
        let cashier = Principal::named(Role::Cashier, "desk-1", None);
        assert_eq!(cashier.resolve_user(8, READERS).map(UserId::get), Ok(8));
        assert_eq!(cashier.resolve_user(0, READERS), Err(AuthError::NoUser));
        let game = Principal::named(Role::Game, "table-1", None);
        assert_eq!(
            game.resolve_user(8, READERS),
            Err(AuthError::RoleRequired(READERS))
        );
        assert_eq!(
            game.own_player(),
            Err(AuthError::RoleRequired(&[Role::Player]))
        );
        assert!(!game.can_see(UserId::new(8).expect("id"), READERS));
    }

    #[test]
    fn the_retired_backend_role_is_refused_by_name() {
        let err = "backend".parse::<Role>().expect_err("retired");
        assert!(err.contains("split"), "{err}");
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert_eq!(
            AuthError::RoleRequired(&[Role::Game, Role::Admin]).to_string(),
            "this operation needs the game or admin role"
        );
    }
}
