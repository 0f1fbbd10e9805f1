//! Who is calling, and what they may touch.

use std::{fmt, str::FromStr};

use betting_domain::{ErrorCode, ServiceError, UserId};

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A game client: only its own wallet and bets.
    Player,
    /// Another service of ours or an operator's backend: moves money, runs rounds.
    Backend,
    /// Everything a backend may do, plus the audit.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Player => "player",
            Role::Backend => "backend",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "player" => Ok(Role::Player),
            "backend" => Ok(Role::Backend),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected player, backend or admin"
            )),
        }
    }
}

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`. Players always have one; a backend token may name no
    /// user (`sub` = "0"), in which case it has no wallet of its own.
    pub user_id: Option<UserId>,
    pub role: Role,
    /// When the token expires (seconds since the epoch): long-lived streams end then.
    pub expires_at: Option<u64>,
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
    #[error("this operation needs the backend or admin role")]
    NeedsBackend,
    #[error("this operation needs the admin role")]
    NeedsAdmin,
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
            _ => ErrorCode::PermissionDenied,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            AuthError::Unauthenticated | AuthError::Token(_) => "UNAUTHENTICATED",
            AuthError::Credentials => "INTERNAL",
            AuthError::NeedsBackend | AuthError::NeedsAdmin => "ROLE_REQUIRED",
            AuthError::OtherUser => "OTHER_USER",
            AuthError::NoUser => "USER_REQUIRED",
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

    pub fn is_privileged(&self) -> bool {
        matches!(self.role, Role::Backend | Role::Admin)
    }

    /// Backend or admin only.
    pub fn require_backend(&self) -> Result<(), AuthError> {
        if self.is_privileged() {
            Ok(())
        } else {
            Err(AuthError::NeedsBackend)
        }
    }

    pub fn require_admin(&self) -> Result<(), AuthError> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(AuthError::NeedsAdmin)
        }
    }

    /// The caller's own user id.
    pub fn own_user(&self) -> Result<UserId, AuthError> {
        self.user_id.ok_or(AuthError::NoUser)
    }

    /// Resolves a `user_id` request field: 0 means the caller; another user is
    /// allowed only for backend and admin callers.
    pub fn resolve_user(&self, requested: i64) -> Result<UserId, AuthError> {
        if requested == 0 {
            return self.own_user();
        }
        let requested = UserId::new(requested).map_err(|_| AuthError::OtherUser)?;
        if Some(requested) == self.user_id || self.is_privileged() {
            Ok(requested)
        } else {
            Err(AuthError::OtherUser)
        }
    }

    /// Whether the caller may see data that belongs to `owner`.
    pub fn can_see(&self, owner: UserId) -> bool {
        self.is_privileged() || self.user_id == Some(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn player(id: i64) -> Principal {
        Principal {
            user_id: UserId::new(id).ok(),
            role: Role::Player,
            expires_at: None,
        }
    }

    #[test]
    fn players_resolve_only_themselves() {
        let p = player(7);
        assert_eq!(p.resolve_user(0).map(UserId::get), Ok(7));
        assert_eq!(p.resolve_user(7).map(UserId::get), Ok(7));
        assert_eq!(p.resolve_user(8), Err(AuthError::OtherUser));
        assert_eq!(p.require_backend(), Err(AuthError::NeedsBackend));
    }

    #[test]
    fn backends_resolve_anyone() {
        let b = Principal {
            user_id: None,
            role: Role::Backend,
            expires_at: None,
        };
        assert_eq!(b.resolve_user(8).map(UserId::get), Ok(8));
        assert_eq!(b.resolve_user(0), Err(AuthError::NoUser));
        assert!(b.require_backend().is_ok());
        assert_eq!(b.require_admin(), Err(AuthError::NeedsAdmin));
    }
}
