//! The plugin's one error type; it maps onto the WIT `error` variant (`Unsent` is reported as
//! `transport`).

use core::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    InvalidConfig(String),
    InvalidInput(String),
    Unauthorized(String),
    Platform {
        code: i64,
        message: String,
        retryable: bool,
    },
    /// No answer came; the request may have reached the platform.
    Transport(String),
    /// A `transport` error (so the WIT and engines see one kind) for a request that certainly
    /// never left (refused, DNS, denied by the host): a create it carried did not happen.
    Unsent(String),
    Storage(String),
}

pub type Result<T, E = Error> = core::result::Result<T, E>;

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::InvalidConfig(msg.into())
    }
    pub fn input(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Error::Unauthorized(msg.into())
    }
    pub fn platform(code: i64, message: impl Into<String>, retryable: bool) -> Self {
        Error::Platform {
            code,
            message: message.into(),
            retryable,
        }
    }
    pub fn storage(msg: impl Into<String>) -> Self {
        Error::Storage(msg.into())
    }
    pub fn transport(msg: impl Into<String>) -> Self {
        Error::Transport(msg.into())
    }
    pub fn unsent(msg: impl Into<String>) -> Self {
        Error::Unsent(msg.into())
    }

    /// Whether the request that failed this way may still have been acted on: no answer, or
    /// one that does not say it was refused. HTTP statuses without a platform code come as
    /// -status (crate::http): a platform code, a 4xx, 429 or 503 is a refusal; a 2xx with an
    /// unreadable body or another 5xx (a gateway timing out, a crash half-way) may hide a
    /// request that took effect.
    pub fn may_have_taken_effect(&self) -> bool {
        match self {
            Error::Platform { code, .. } => {
                (-299..=-200).contains(code) || ((-599..=-500).contains(code) && *code != -503)
            }
            Error::InvalidConfig(_) | Error::InvalidInput(_) | Error::Unauthorized(_) => false,
            Error::Unsent(_) => false,
            Error::Transport(_) | Error::Storage(_) => true,
        }
    }

    /// Whether repeating the same call unchanged may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Platform { retryable, .. } => *retryable,
            Error::Transport(_) | Error::Unsent(_) | Error::Storage(_) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidConfig(m) => write!(f, "invalid config: {m}"),
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::Unauthorized(m) => write!(f, "unauthorized: {m}"),
            Error::Platform { code, message, .. } => write!(f, "platform error {code}: {message}"),
            Error::Transport(m) | Error::Unsent(m) => write!(f, "transport: {m}"),
            Error::Storage(m) => write!(f, "storage: {m}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::InvalidInput(format!("malformed JSON: {e}"))
    }
}
