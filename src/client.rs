//! gRPC clients for the command line (`contrastive embed`, `health`, `finetune`) and the tests.

use anyhow::{anyhow, Context, Result};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::proto::v1::embedding_service_client::EmbeddingServiceClient;
use crate::proto::v1::fine_tune_service_client::FineTuneServiceClient;

/// Adds `authorization: Bearer <key>` to every call when a key is set.
#[derive(Clone)]
pub struct BearerAuth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type AuthChannel = InterceptedService<Channel, BearerAuth>;

pub async fn connect(addr: &str) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("{addr:?} is not a server address (e.g. http://127.0.0.1:50051)"))?;
    endpoint.connect().await.with_context(|| format!("cannot connect to {addr}"))
}

fn bearer(api_key: Option<&str>) -> Result<BearerAuth> {
    let value = api_key
        .map(|key| format!("Bearer {key}").parse())
        .transpose()
        .map_err(|_| anyhow!("the API key holds characters not allowed in a header"))?;
    Ok(BearerAuth(value))
}

pub async fn embedding_client(addr: &str, api_key: Option<&str>) -> Result<EmbeddingServiceClient<AuthChannel>> {
    let channel = connect(addr).await?;
    Ok(EmbeddingServiceClient::with_interceptor(channel, bearer(api_key)?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

pub async fn finetune_client(addr: &str, api_key: Option<&str>) -> Result<FineTuneServiceClient<AuthChannel>> {
    let channel = connect(addr).await?;
    Ok(FineTuneServiceClient::with_interceptor(channel, bearer(api_key)?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// The serving status of `service` ("" = the whole server) as grpc.health.v1 names it.
pub async fn health(addr: &str, service: &str) -> Result<String> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut client = HealthClient::new(connect(addr).await?);
    let response = client.check(HealthCheckRequest { service: service.to_string() }).await.map_err(status_error)?;
    let status = tonic_health::pb::health_check_response::ServingStatus::try_from(response.into_inner().status)
        .unwrap_or_default();
    Ok(status.as_str_name().to_string())
}

/// A gRPC status as an error a person can read.
pub fn status_error(status: Status) -> anyhow::Error {
    anyhow!("{:?}: {}", status.code(), status.message())
}
