//! gRPC clients for the command line (`contrastive embed`, `health`, `finetune`) and the tests.

use anyhow::{anyhow, bail, Context, Result};
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

/// The servers behind `addrs` (each `http://HOST:PORT` or `https://…`): a plaintext address
/// whose host name resolves to several IP addresses stands for each of them, as a headless
/// Kubernetes Service names every ready pod. Duplicates are dropped; order is kept.
pub async fn resolve_servers(addrs: &[String]) -> Result<Vec<String>> {
    let mut servers: Vec<String> = Vec::new();
    for addr in addrs {
        let uri: tonic::codegen::http::Uri =
            addr.parse().with_context(|| format!("{addr:?} is not a server address (e.g. http://127.0.0.1:50051)"))?;
        let host = uri.host().with_context(|| format!("{addr:?} names no host"))?;
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok();
        // TLS checks the certificate against the name: an https address keeps its name.
        let found = if uri.scheme_str() == Some("http") && !literal {
            let port = uri.port_u16().unwrap_or(80);
            let resolved = tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("cannot resolve the server name {host:?} of {addr:?}"))?;
            resolved.map(|socket| format!("http://{socket}")).collect()
        } else {
            vec![addr.trim_end_matches('/').to_owned()]
        };
        for server in found {
            if !servers.contains(&server) {
                servers.push(server);
            }
        }
    }
    anyhow::ensure!(!servers.is_empty(), "no server address given");
    Ok(servers)
}

pub async fn embedding_client(addr: &str, api_key: Option<&str>) -> Result<EmbeddingServiceClient<AuthChannel>> {
    let channel = connect(addr).await?;
    Ok(EmbeddingServiceClient::with_interceptor(channel, bearer(api_key)?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// An embedding client for every server of `addrs` ([`resolve_servers`]), each connected now,
/// with its address. A server that cannot be reached is left out with a warning on stderr; an
/// error when none can.
pub async fn embedding_clients(
    addrs: &[String],
    api_key: Option<&str>,
) -> Result<Vec<(String, EmbeddingServiceClient<AuthChannel>)>> {
    let servers = resolve_servers(addrs).await?;
    let connecting = servers.iter().map(|server| embedding_client(server, api_key));
    let mut clients = Vec::new();
    let mut failures = Vec::new();
    for (server, client) in servers.iter().zip(futures_util::future::join_all(connecting).await) {
        match client {
            Ok(client) => clients.push((server.clone(), client)),
            Err(error) => failures.push(format!("{error:#}")),
        }
    }
    if clients.is_empty() {
        bail!("no server could be reached: {}", failures.join("; "));
    }
    for failure in &failures {
        eprintln!("warning: {failure}; using the other servers");
    }
    Ok(clients)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A name stands for every address it resolves to, duplicates go, https keeps its name
    /// (its certificate names the host, not the address).
    #[tokio::test]
    async fn server_names_resolve_to_each_address() {
        let addrs = ["http://localhost:7001", "http://127.0.0.1:7001", "https://example.test:443"].map(String::from);
        let servers = resolve_servers(&addrs).await.unwrap();
        assert_eq!(servers.iter().filter(|s| *s == "http://127.0.0.1:7001").count(), 1, "{servers:?}");
        assert_eq!(servers.last().map(String::as_str), Some("https://example.test:443"), "{servers:?}");
        let err = resolve_servers(&["not a url".to_owned()]).await.unwrap_err();
        assert!(err.to_string().contains("\"not a url\" is not a server address"), "{err}");
        assert!(resolve_servers(&[]).await.unwrap_err().to_string().contains("no server address"));
    }
}
