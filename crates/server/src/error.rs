//! One place maps errors to gRPC: each [`RejectionKind`] to its code, the reason into a
//! `google.rpc.ErrorInfo` and, for bad input, the field into a `BadRequest` violation.

use socialcard_domain::{Rejection, RejectionKind};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every socialcard error.
pub const ERROR_DOMAIN: &str = "socialcard";

/// What a service call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A rule refused the request; nothing was written.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// Storage could not be reached or timed out: retrying later may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A bug or corrupted data; logged, never detailed to the caller.
    #[error("internal error: {0}")]
    Internal(String),
}

pub fn code_of(kind: RejectionKind) -> Code {
    match kind {
        RejectionKind::InvalidArgument => Code::InvalidArgument,
        RejectionKind::FailedPrecondition => Code::FailedPrecondition,
        RejectionKind::PermissionDenied => Code::PermissionDenied,
        RejectionKind::NotFound => Code::NotFound,
        RejectionKind::AlreadyExists => Code::AlreadyExists,
        RejectionKind::Aborted => Code::Aborted,
        RejectionKind::Unavailable => Code::Unavailable,
        RejectionKind::ResourceExhausted => Code::ResourceExhausted,
    }
}

pub fn rejection_status(r: &Rejection) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(r.reason, ERROR_DOMAIN, std::collections::HashMap::new());
    if let (RejectionKind::InvalidArgument, Some(field)) = (r.kind, r.field) {
        details.add_bad_request_violation(field, r.message.clone());
    }
    Status::with_error_details(code_of(r.kind), r.message.clone(), details)
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Rejected(r) => rejection_status(&r),
            ApiError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "storage unavailable");
                let details = ErrorDetails::with_error_info(
                    "STORAGE_UNAVAILABLE",
                    ERROR_DOMAIN,
                    std::collections::HashMap::new(),
                );
                Status::with_error_details(Code::Unavailable, "storage is unavailable, retry later", details)
            }
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                let details = ErrorDetails::with_error_info("INTERNAL", ERROR_DOMAIN, std::collections::HashMap::new());
                Status::with_error_details(Code::Internal, "internal error", details)
            }
        }
    }
}

/// The machine-readable reason of a status, if it carries one.
pub fn reason_of(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|i| i.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_carry_code_reason_and_field() {
        let s = rejection_status(&Rejection::invalid("citizen_id", "CITIZEN_ID_CHECK_DIGIT", "bad check"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(reason_of(&s).as_deref(), Some("CITIZEN_ID_CHECK_DIGIT"));
        let br = s.get_details_bad_request().unwrap();
        assert_eq!(br.field_violations[0].field, "citizen_id");
        assert_eq!(rejection_status(&Rejection::denied("WRONG_BANK", "x")).code(), Code::PermissionDenied);
    }
}
