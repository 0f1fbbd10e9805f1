//! The error contract between services and the gRPC edge.
//!
//! Each service has its own `thiserror` enum and says, through [`ServiceError`],
//! which [`ErrorCode`] each variant is. The API crate turns that into a
//! `tonic::Status` in exactly one place, so codes are consistent everywhere and
//! internal detail never reaches a client.

/// What kind of failure an error is, independent of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request itself is malformed; see the field violations.
    InvalidArgument,
    /// The request is well formed but the system is not in a state that allows it
    /// (insufficient funds, round not open, bet not cancellable).
    FailedPrecondition,
    NotFound,
    /// The thing exists already, or an idempotency key was reused with another payload.
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    /// A dependency (PostgreSQL, Redis, another service) cannot be reached; retry.
    Unavailable,
    /// This server is shutting down: reconnect (to another instance) and
    /// carry on. Expected, so not logged; the message is ours and says so.
    ShuttingDown,
    /// A limit was hit.
    ResourceExhausted,
    /// The call's deadline passed before it finished; whatever it did was
    /// rolled back or is replayed by a retry with the same key.
    DeadlineExceeded,
    /// A bug or an unexpected failure. The message sent is generic; the detail is logged.
    Internal,
}

/// Declares [`ErrorReason`] and its [`ErrorReason::ALL`] from one list, so
/// the list cannot miss a variant.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// Every `google.rpc.ErrorInfo.reason` a server can send: the trait
        /// [`ServiceError::reason`] returns one, so no other string can be
        /// sent. Each is a value of the proto enum `betting.v1.ErrorReason`
        /// (proto/betting/v1/errors.proto) named `ERROR_REASON_` + the
        /// string; the api crate's tests check the two lists are the same.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorReason {
            $($(#[$doc])* $variant,)*
        }

        impl ErrorReason {
            /// Every reason, in the proto's order.
            pub const ALL: &'static [ErrorReason] = &[$(ErrorReason::$variant,)*];

            /// The string sent as `ErrorInfo.reason` (UPPER_SNAKE_CASE).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorReason::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    /// A malformed request field.
    InvalidArgument = "INVALID_ARGUMENT",
    /// No valid token; on a stream, the token expired.
    Unauthenticated = "UNAUTHENTICATED",
    /// The caller's role may not do this.
    RoleRequired = "ROLE_REQUIRED",
    /// A player named another user.
    OtherUser = "OTHER_USER",
    /// A token that names no user, without a `user_id`.
    UserRequired = "USER_REQUIRED",
    InsufficientFunds = "INSUFFICIENT_FUNDS",
    BalanceLimit = "BALANCE_LIMIT",
    IdempotencyKeyReused = "IDEMPOTENCY_KEY_REUSED",
    RoundNotFound = "ROUND_NOT_FOUND",
    RoundNotOpen = "ROUND_NOT_OPEN",
    RoundExists = "ROUND_EXISTS",
    RoundWrongState = "ROUND_WRONG_STATE",
    RoundSettledOtherwise = "ROUND_SETTLED_OTHERWISE",
    BetNotFound = "BET_NOT_FOUND",
    BetNotCancellable = "BET_NOT_CANCELLABLE",
    RateLimited = "RATE_LIMITED",
    TooManyOpenBets = "TOO_MANY_OPEN_BETS",
    TooManyStreams = "TOO_MANY_STREAMS",
    StreamTooSlow = "STREAM_TOO_SLOW",
    StreamEnded = "STREAM_ENDED",
    ShuttingDown = "SHUTTING_DOWN",
    Overloaded = "OVERLOADED",
    DeadlineExceeded = "DEADLINE_EXCEEDED",
    RequestUnreadable = "REQUEST_UNREADABLE",
    Unavailable = "UNAVAILABLE",
    Internal = "INTERNAL",
    AuditFailed = "AUDIT_FAILED",
    UserBusy = "USER_BUSY",
    /// StakeService only (as are the four below).
    NoMatchingStake = "NO_MATCHING_STAKE",
    AlreadyPaid = "ALREADY_PAID",
    AlreadyRefunded = "ALREADY_REFUNDED",
    RefundNotDue = "REFUND_NOT_DUE",
    PayoutNotDue = "PAYOUT_NOT_DUE",
}

impl std::fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One bad field of a request, reported as a `google.rpc.BadRequest` violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

/// Implemented by every service's error enum.
pub trait ServiceError: std::error::Error {
    fn code(&self) -> ErrorCode;

    /// A stable, machine-readable reason (`INSUFFICIENT_FUNDS`), sent as
    /// `google.rpc.ErrorInfo.reason`: one of [`ErrorReason`], so of the
    /// proto's `betting.v1.ErrorReason`.
    fn reason(&self) -> ErrorReason;

    /// For [`ErrorCode::InvalidArgument`]: which fields were bad and why.
    fn violations(&self) -> Vec<FieldViolation> {
        Vec::new()
    }

    /// For a refusal that waiting cures (a rate limit): how long to wait,
    /// sent as `google.rpc.RetryInfo`.
    fn retry_after(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Collects every bad field of a request while it is parsed, so a client learns
/// about all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps the value of a field that parsed, records why one did not.
    pub fn check<T, E: std::fmt::Display>(
        &mut self,
        field: &'static str,
        parsed: Result<T, E>,
    ) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(e) => {
                self.0.push(FieldViolation::new(field, e.to_string()));
                None
            }
        }
    }

    pub fn add(&mut self, field: &'static str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The error to return once parsing is over: only meaningful when some field failed.
    pub fn into_error(self) -> InvalidRequest {
        InvalidRequest(self.0)
    }
}

/// A request with one or more bad fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request: {}", summary(.0))]
pub struct InvalidRequest(pub Vec<FieldViolation>);

impl InvalidRequest {
    pub fn field(field: &'static str, description: impl Into<String>) -> Self {
        Self(vec![FieldViolation::new(field, description)])
    }
}

fn summary(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{} {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ServiceError for InvalidRequest {
    fn code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }

    fn reason(&self) -> ErrorReason {
        ErrorReason::InvalidArgument
    }

    fn violations(&self) -> Vec<FieldViolation> {
        self.0.clone()
    }
}
