//! The gRPC transport: converts wire requests to calls of [`crate::Coordinator`] and errors to statuses.

use socialcard_proto::loss::v1 as pb;
use socialcard_proto::loss::v1::loss_coordinator_service_server::{
    LossCoordinatorService, LossCoordinatorServiceServer,
};
use tonic::{Request, Response, Status};

use crate::Coordinator;

#[derive(Clone, Debug)]
pub struct CoordinatorGrpc {
    coordinator: Coordinator,
}

impl CoordinatorGrpc {
    pub fn new(coordinator: Coordinator) -> Self {
        Self { coordinator }
    }

    pub fn into_server(self) -> LossCoordinatorServiceServer<Self> {
        LossCoordinatorServiceServer::new(self)
    }
}

macro_rules! handlers {
    ($($rpc:ident($req:ty) -> $resp:ty;)*) => {
        #[tonic::async_trait]
        impl LossCoordinatorService for CoordinatorGrpc {
            $(
                async fn $rpc(&self, request: Request<$req>) -> Result<Response<$resp>, Status> {
                    self.coordinator.$rpc(request.into_inner()).await.map(Response::new).map_err(Status::from)
                }
            )*
        }
    };
}

handlers! {
    report_loss(pb::ReportLossRequest) -> pb::ReportLossResponse;
    unlock(pb::UnlockRequest) -> pb::UnlockResponse;
    get_case(pb::GetCaseRequest) -> pb::GetCaseResponse;
    list_cases(pb::ListCasesRequest) -> pb::ListCasesResponse;
    list_timers(pb::ListTimersRequest) -> pb::ListTimersResponse;
}

/// The fully qualified gRPC service name, as health and reflection report it.
pub const SERVICE_NAME: &str = <LossCoordinatorServiceServer<CoordinatorGrpc> as tonic::server::NamedService>::NAME;
