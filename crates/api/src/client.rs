//! HTTP/JSON client over a unix socket: used by the CLI to reach vireod, and by vireod to
//! reach each VM's worker. One request per connection keeps it simple and robust to a
//! daemon restart between two calls.

use crate::types::{ErrorBody, ErrorKind};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach {socket}: is vireod running? (start it with `vireod --state-dir DIR --socket PATH`, or point --socket / VIREO_SOCKET at it)")]
    Connect {
        /// Socket path.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{}", .body.error)]
    Api {
        /// HTTP status.
        status: u16,
        /// Error body.
        body: ErrorBody,
    },
    /// The exchange itself failed.
    #[error("HTTP exchange with {socket} failed: {detail}")]
    Http {
        /// Socket path.
        socket: PathBuf,
        /// What failed.
        detail: String,
    },
    /// The call did not finish in time.
    #[error("no answer from {0} within {1:?}")]
    Timeout(PathBuf, Duration),
}

impl ClientError {
    /// The API error kind, when the server answered with one.
    pub fn api_kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api { body, .. } => Some(body.kind),
            _ => None,
        }
    }
}

/// A client bound to one unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for `socket` with a 10-minute default timeout (long jobs answer at the end).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: Duration::from_secs(600),
        }
    }

    /// Same client with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    /// POST `body` to `path`.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// PUT `body` to `path`.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// PATCH `body` to `path`.
    pub async fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::PATCH, path, Some(body)).await
    }

    /// DELETE `path`.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::DELETE, path, None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout(self.socket.clone(), self.timeout)),
        }
    }

    async fn exchange<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let http = |detail: String| ClientError::Http {
            socket: self.socket.clone(),
            detail,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| http(e.to_string()))?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vireo")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            let data: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            serde_json::from_slice(data).map_err(|e| http(format!("bad response body: {e}")))
        } else {
            let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
                kind: if status == StatusCode::NOT_FOUND {
                    ErrorKind::NotFound
                } else {
                    ErrorKind::Internal
                },
                error: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
            });
            Err(ClientError::Api {
                status: status.as_u16(),
                body,
            })
        }
    }
}
