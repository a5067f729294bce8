//! One error type for the whole core. Every variant names what it is about (a file, an adapter,
//! a module, a tensor or an argument) so that the message alone tells the user what to fix.

use std::path::PathBuf;

/// What kind of caller argument was wrong; the binding maps each to its own Python exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgumentKind {
    Shape,
    DType,
    Layout,
    Value,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is not what it claims to be: truncated, malformed, or with a header that lies.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    /// Stored bytes that do not match their recorded checksum.
    #[error("{}: checksum mismatch in {what}", path.display())]
    Checksum { path: PathBuf, what: String },
    /// Adapters, modules or tensors that are individually valid but do not fit together.
    #[error("{context}: {message}")]
    Incompatible { context: String, message: String },
    /// A caller-supplied argument with the wrong shape, dtype, memory layout or value.
    #[error("{argument}: {message}")]
    InvalidArgument { argument: String, kind: ArgumentKind, message: String },
    /// NaN or infinity where only finite numbers make sense.
    #[error("{context}: {message}")]
    NonFinite { context: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format { path: path.into(), message: message.into() }
    }

    pub fn incompatible(context: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Incompatible { context: context.into(), message: message.into() }
    }

    pub fn argument(argument: impl Into<String>, kind: ArgumentKind, message: impl Into<String>) -> Self {
        Error::InvalidArgument { argument: argument.into(), kind, message: message.into() }
    }

    pub fn non_finite(context: impl Into<String>, message: impl Into<String>) -> Self {
        Error::NonFinite { context: context.into(), message: message.into() }
    }
}
