//! Why a rule refused: a small closed set of kinds (mapped to gRPC codes at the edge) plus a stable,
//! machine-readable reason string that is part of the API.

use std::fmt;

/// The kind of refusal; each maps to exactly one gRPC status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectionKind {
    /// The request itself is malformed, whatever the system's state (INVALID_ARGUMENT).
    InvalidArgument,
    /// The request is well formed but the card's state forbids it (FAILED_PRECONDITION).
    FailedPrecondition,
    /// The caller may not do this (PERMISSION_DENIED): another bank's card, an unregistered phone.
    PermissionDenied,
    /// What the request names does not exist (NOT_FOUND).
    NotFound,
    /// It exists already, or an idempotency key was reused for another request (ALREADY_EXISTS).
    AlreadyExists,
    /// A concurrent change won; retrying may succeed (ABORTED).
    Aborted,
    /// Another part of the system is out of reach; retrying later will succeed (UNAVAILABLE).
    Unavailable,
    /// The caller sends more than its share (RESOURCE_EXHAUSTED): slow down and retry.
    ResourceExhausted,
}

/// A rule's refusal: kind, stable reason code, human message and, for bad input, the offending field.
/// Messages never contain personal data (ID numbers, names, phones).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectionKind,
    pub reason: &'static str,
    pub message: String,
    pub field: Option<&'static str>,
}

impl Rejection {
    pub fn new(kind: RejectionKind, reason: &'static str, message: impl Into<String>) -> Self {
        Self { kind, reason, message: message.into(), field: None }
    }

    pub fn invalid(field: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self { kind: RejectionKind::InvalidArgument, reason, message: message.into(), field: Some(field) }
    }

    pub fn precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(RejectionKind::FailedPrecondition, reason, message)
    }

    pub fn denied(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(RejectionKind::PermissionDenied, reason, message)
    }

    pub fn not_found(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(RejectionKind::NotFound, reason, message)
    }

    /// Names the request field this rejection is about (for field violations on the wire).
    pub fn at(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for Rejection {}
