//! The plugin's one error type; it maps 1:1 onto the WIT `error` variant.

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
    Transport(String),
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

    /// Whether repeating the same call unchanged may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Platform { retryable, .. } => *retryable,
            Error::Transport(_) | Error::Storage(_) => true,
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
            Error::Transport(m) => write!(f, "transport: {m}"),
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
