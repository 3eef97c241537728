//! The OpenAI-compatible embeddings endpoint, over HTTP, that vector databases and their
//! embedding functions already call (Milvus, LanceDB, Weaviate's OpenAI module, LangChain,
//! LlamaIndex): `POST /v1/embeddings`, `GET /v1/models` and `GET /health`.
//!
//! Each `input` string is one image: base64, or a `data:image/...;base64,` URI. `model` is a name
//! or `name:version` (empty: the default model). A request goes through the same path as gRPC
//! `Embed` ([`EmbeddingApi::embed_call`]: validation, decode budget, the batching queue), so the
//! embeddings are the same and so are the errors, answered with HTTP codes and OpenAI's error
//! body: `{"error": {"message", "type", "param", "code"}}`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tonic::{Code, Request, Status};

use super::embedding::EmbeddingApi;
use crate::auth::ApiKeys;
use crate::proto::v1::embedding_service_server::EmbeddingService as _;
use crate::proto::v1::{input, EmbedRequest, Input, ListModelsRequest, VersionInfo, VersionState};

struct Endpoint {
    api: EmbeddingApi,
    keys: ApiKeys,
}

/// The routes; bodies up to `max_body_bytes` (base64 makes images a third larger).
pub fn router(api: EmbeddingApi, keys: ApiKeys, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint: try POST /v1/embeddings") })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(Arc::new(Endpoint { api, keys }))
}

async fn embeddings(
    State(endpoint): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(status) = endpoint.keys.check_authorization(authorization(&headers)) {
        return status_response(&status);
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), &rejection.body_text()),
    };
    let request = match parse_request(&body) {
        Ok(request) => request,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let response = match endpoint.api.embed_call("OpenAI/Embeddings", request.embed).await {
        Ok(response) => response,
        Err(status) => return status_response(&status),
    };
    let data: Vec<Value> = response
        .embeddings
        .iter()
        .enumerate()
        .map(|(index, embedding)| {
            let values = match request.encoding {
                Encoding::Float => json!(embedding.values),
                Encoding::Base64 => json!(base64_floats(&embedding.values)),
            };
            json!({ "object": "embedding", "index": index, "embedding": values })
        })
        .collect();
    Json(json!({
        "object": "list",
        "data": data,
        "model": format!("{}:{}", response.model, response.version),
        // Images are not tokens; the field is there because clients read it.
        "usage": { "prompt_tokens": 0, "total_tokens": 0 },
    }))
    .into_response()
}

/// Every model by name (its newest ready version) and each ready version as `name:version`.
async fn models(State(endpoint): State<Arc<Endpoint>>, headers: HeaderMap) -> Response {
    if let Err(status) = endpoint.keys.check_authorization(authorization(&headers)) {
        return status_response(&status);
    }
    let listed = match endpoint.api.list_models(Request::new(ListModelsRequest {})).await {
        Ok(listed) => listed.into_inner(),
        Err(status) => return status_response(&status),
    };
    let entry = |id: String, version: &VersionInfo| json!({ "id": id, "object": "model", "created": created_unix_seconds(version), "owned_by": "contrastive" });
    let mut data = Vec::new();
    for model in listed.models {
        let ready: Vec<_> = model.versions.iter().filter(|v| v.state() == VersionState::Ready).collect();
        if let Some(latest) = ready.last() {
            data.push(entry(model.name.clone(), latest));
        }
        data.extend(ready.iter().map(|version| entry(format!("{}:{}", model.name, version.version), version)));
    }
    Json(json!({ "object": "list", "data": data })).into_response()
}

/// The manifest's creation time in Unix seconds (0 when it has none).
fn created_unix_seconds(version: &VersionInfo) -> u64 {
    let created_at = version.manifest.as_ref().map_or("", |m| m.created_at.as_str());
    humantime::parse_rfc3339_weak(created_at)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// 200 when the default model serves, 503 before.
async fn health(State(endpoint): State<Arc<Endpoint>>) -> Response {
    if endpoint.api.is_serving() {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "unavailable" }))).into_response()
    }
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    Float,
    /// Little-endian f32 bytes in base64, as OpenAI answers (the Python client asks for it).
    Base64,
}

#[derive(Debug)]
struct ParsedRequest {
    embed: EmbedRequest,
    encoding: Encoding,
}

/// The request body as an [`EmbedRequest`], or a message naming what is wrong.
fn parse_request(body: &[u8]) -> Result<ParsedRequest, String> {
    let body: Value = serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let body = body.as_object().ok_or("the body must be a JSON object")?;
    let (model, version) = match body.get("model") {
        None | Some(Value::Null) => (String::new(), 0),
        Some(Value::String(model)) => parse_model(model)?,
        Some(_) => return Err("model must be a string: a name or name:version".into()),
    };
    let strings: Vec<&str> = match body.get("input") {
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                item.as_str().ok_or_else(|| {
                    format!(
                        "input[{index}] is not a string: each input is an image, as base64 or a \
                         data:image/...;base64, URI (token arrays are for text models)"
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        None => return Err("input is required: an image (base64 or a data: URI) or a list of them".into()),
        Some(_) => return Err("input must be a string or a list of strings".into()),
    };
    let inputs = strings
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let image = decode_image_string(text).map_err(|e| format!("input[{index}]: {e}"))?;
            Ok(Input { data: Some(input::Data::Image(image)) })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let encoding = match body.get("encoding_format") {
        None | Some(Value::Null) => Encoding::Float,
        Some(Value::String(format)) if format == "float" => Encoding::Float,
        Some(Value::String(format)) if format == "base64" => Encoding::Base64,
        Some(other) => return Err(format!("encoding_format must be \"float\" or \"base64\", not {other}")),
    };
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => 0,
        Some(value) => match value.as_u64() {
            Some(d @ 1..=65_536) => d as u32,
            _ => return Err(format!("dimensions must be a whole number from 1 to 65536, not {value}")),
        },
    };
    Ok(ParsedRequest { embed: EmbedRequest { model, version, inputs, normalize: None, dimensions }, encoding })
}

/// `name` or `name:version` (version ≥ 1; `name:latest` is `name`).
fn parse_model(text: &str) -> Result<(String, u64), String> {
    match text.rsplit_once(':') {
        None => Ok((text.to_string(), 0)),
        Some((name, "latest")) => Ok((name.to_string(), 0)),
        Some((name, version)) => match version.parse::<u64>() {
            Ok(version) if version >= 1 => Ok((name.to_string(), version)),
            _ => Err(format!("model {text:?}: the version after ':' must be a number from 1 (or \"latest\")")),
        },
    }
}

/// The bytes of a base64 image or `data:<type>;base64,<data>` URI; whitespace (line-wrapped
/// base64) and missing padding are accepted.
fn decode_image_string(text: &str) -> Result<Vec<u8>, String> {
    let payload = match text.strip_prefix("data:") {
        Some(uri) => {
            let (meta, data) = uri.split_once(',').ok_or("a data URI needs a ',' before its data")?;
            if !meta.ends_with(";base64") {
                return Err("a data URI must be base64: data:image/png;base64,...".into());
            }
            data
        }
        None => text,
    };
    let compact: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err("the image is empty".into());
    }
    const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(compact.as_bytes()).map_err(|e| format!("not base64 ({e}): send the image's bytes in base64"))
}

fn base64_floats(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A gRPC status from the embedding path as the HTTP answer OpenAI's clients understand.
fn status_response(status: &Status) -> Response {
    let code = match status.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded | Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = error(code, status.message());
    if code == StatusCode::TOO_MANY_REQUESTS || code == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn error(code: StatusCode, message: &str) -> Response {
    let kind = match code {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        c if c.is_client_error() => "invalid_request_error",
        _ => "server_error",
    };
    let body = json!({ "error": { "message": message, "type": kind, "param": null, "code": null } });
    (code, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

    #[test]
    fn images_come_as_base64_or_data_uris() {
        // "iVBORw0KGgo=" is the PNG signature in base64, written by hand.
        assert_eq!(decode_image_string("iVBORw0KGgo=").unwrap(), PNG_MAGIC);
        assert_eq!(decode_image_string("iVBORw0KGgo").unwrap(), PNG_MAGIC, "padding is optional");
        assert_eq!(decode_image_string("iVBORw0K\nGgo=").unwrap(), PNG_MAGIC, "line-wrapped");
        assert_eq!(decode_image_string("data:image/png;base64,iVBORw0KGgo=").unwrap(), PNG_MAGIC);
        assert!(decode_image_string("data:image/png,rawbytes").unwrap_err().contains("base64"));
        assert!(decode_image_string("").unwrap_err().contains("empty"));
        assert!(decode_image_string("not*base64").unwrap_err().contains("not base64"));
    }

    #[test]
    fn models_are_names_or_name_colon_version() {
        assert_eq!(parse_model("fmnist").unwrap(), ("fmnist".to_string(), 0));
        assert_eq!(parse_model("fmnist:3").unwrap(), ("fmnist".to_string(), 3));
        assert_eq!(parse_model("fmnist:latest").unwrap(), ("fmnist".to_string(), 0));
        assert!(parse_model("fmnist:0").is_err());
        assert!(parse_model("fmnist:v2").is_err());
    }

    #[test]
    fn requests_parse_into_embed_requests() {
        let parsed = parse_request(
            br#"{"model": "m:2", "input": ["iVBORw0KGgo=", "data:image/png;base64,iVBORw0KGgo="],
                 "encoding_format": "base64", "dimensions": 8, "user": "someone"}"#,
        )
        .unwrap();
        assert_eq!((parsed.embed.model.as_str(), parsed.embed.version), ("m", 2));
        assert_eq!(parsed.embed.inputs.len(), 2);
        assert_eq!(parsed.embed.dimensions, 8);
        assert_eq!(parsed.encoding, Encoding::Base64);
        let one = parse_request(br#"{"model": "m", "input": "iVBORw0KGgo="}"#).unwrap();
        assert_eq!((one.embed.inputs.len(), one.encoding), (1, Encoding::Float));

        for (body, expected) in [
            (&br#"{"model": "m", "input": [[1, 2, 3]]}"#[..], "input[0] is not a string"),
            (br#"{"model": "m"}"#, "input is required"),
            (br#"{"model": "m", "input": ["iVBORw0KGgo=", "%%"]}"#, "input[1]: not base64"),
            (br#"{"model": "m", "input": "iVBORw0KGgo=", "encoding_format": "int8"}"#, "encoding_format"),
            (br#"{"model": "m", "input": "iVBORw0KGgo=", "dimensions": 0}"#, "dimensions"),
            (br#"{"model": 7, "input": "iVBORw0KGgo="}"#, "model must be a string"),
            (b"[1, 2]", "JSON object"),
            (b"{", "not JSON"),
        ] {
            let error = parse_request(body).unwrap_err();
            assert!(error.contains(expected), "{error:?} should name {expected:?}");
        }
    }

    #[test]
    fn base64_answers_are_little_endian_f32() {
        // 1.0f32 is 0x3f800000: bytes 00 00 80 3f, "AACAPw==" in base64; -2.0 is 0xc0000000.
        assert_eq!(base64_floats(&[1.0]), "AACAPw==");
        assert_eq!(base64_floats(&[1.0, -2.0]), "AACAPwAAAMA=");
    }

    #[test]
    fn statuses_map_to_http_codes() {
        let cases = [
            (Status::invalid_argument("x"), StatusCode::BAD_REQUEST),
            (Status::not_found("x"), StatusCode::NOT_FOUND),
            (Status::unauthenticated("x"), StatusCode::UNAUTHORIZED),
            (Status::resource_exhausted("x"), StatusCode::TOO_MANY_REQUESTS),
            (Status::unavailable("x"), StatusCode::SERVICE_UNAVAILABLE),
            (Status::internal("x"), StatusCode::INTERNAL_SERVER_ERROR),
        ];
        for (status, expected) in cases {
            let response = status_response(&status);
            assert_eq!(response.status(), expected, "{status:?}");
        }
        assert_eq!(status_response(&Status::resource_exhausted("full")).headers()[header::RETRY_AFTER], "1");
    }
}
