//! The Session tunnel plumbing shared by the fake daemon and the test client.
//!
//! `Control/Session` is a bidi stream of `BytesMessage` whose concatenated payloads are one inner
//! HTTP/2 connection. [`pump`] turns the two directions of that stream into a
//! [`tokio::io::DuplexStream`] an HTTP/2 client (daemon side) or server (client side) runs on.

use std::future::Future;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};

/// Size of each chunk read from the inner connection and sent as one `BytesMessage`.
const CHUNK: usize = 32 * 1024;

/// The two pump tasks behind a tunnel; aborted on drop.
pub struct Pump {
    /// Fires when the inbound side ended (the peer half-closed, reset, or errored).
    pub inbound_done: Option<oneshot::Receiver<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Pump {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Bridges the payloads of an inbound message stream and an outbound sender to a duplex stream:
/// bytes arriving on `inbound` can be read from the returned stream, bytes written to it are sent
/// to `outbound` in chunks. When `inbound` ends, the returned stream sees EOF; when the returned
/// stream is dropped, `outbound` is dropped (ending the outbound message stream).
pub fn pump<S>(mut inbound: S, outbound: mpsc::Sender<Bytes>) -> (DuplexStream, Pump)
where
    S: Stream<Item = Bytes> + Send + Unpin + 'static,
{
    let (local, remote) = tokio::io::duplex(256 * 1024);
    let (mut rd, mut wr) = tokio::io::split(remote);
    let (done_tx, done_rx) = oneshot::channel();
    let a = tokio::spawn(async move {
        while let Some(data) = inbound.next().await {
            if wr.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
        let _ = done_tx.send(());
    });
    let b = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if outbound
                        .send(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    (
        local,
        Pump {
            inbound_done: Some(done_rx),
            tasks: vec![a, b],
        },
    )
}

/// A connector that hands out one already-open stream, once (the tunnel cannot be redialled).
struct OnceConnector(Option<DuplexStream>);

impl tonic::codegen::Service<Uri> for OnceConnector {
    type Response = TokioIo<DuplexStream>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        std::future::ready(self.0.take().map(TokioIo::new).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "session tunnel already closed",
            )
        }))
    }
}

/// Runs the HTTP/2 client side of a tunnel (the daemon's side): a tonic channel on `io`.
/// `:authority` is `localhost`, as BuildKit's session dialer sends.
pub async fn client_channel(io: DuplexStream) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(OnceConnector(Some(io)))
        .await
}

/// Serves `routes` as the HTTP/2 server side of a tunnel (the build client's side) until the
/// connection ends.
pub fn serve_routes(
    io: DuplexStream,
    routes: tonic::service::Routes,
) -> impl Future<Output = ()> + Send {
    let svc = TowerToHyperService::new(routes.prepare());
    async move {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(1000)
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }
}
