//! The held and relayed sessions' inner connections toward their build clients, by session uuid,
//! so that the router itself can call a client's services (its FileSync, to read the Dockerfile
//! before placement: `crate::content`). The daemon's own calls are relayed on the same
//! connection as separate inner streams, untouched.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The header listing one method a session's client serves (one value per method).
pub const METHOD_HEADER: &str = "x-docker-expose-session-grpc-method";

/// A way to open inner streams toward one session's build client.
#[derive(Clone)]
pub struct InnerClient {
    send: h2::client::SendRequest<Bytes>,
    methods: Arc<[String]>,
}

impl InnerClient {
    /// Whether the client said it serves `method` (`/pkg.Service/Method`).
    pub fn serves(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m.eq_ignore_ascii_case(method))
    }

    /// The inner HTTP/2 connection toward the client (the router is its HTTP/2 client).
    pub fn sender(&self) -> h2::client::SendRequest<Bytes> {
        self.send.clone()
    }
}

struct Entry {
    client: InnerClient,
    generation: u64,
}

/// Live sessions' inner clients. Entries are removed when their session ends toward the client
/// (its [`Registration`] is dropped), so a held clone never keeps a connection from closing.
#[derive(Default)]
pub struct Directory {
    entries: DashMap<String, Entry>,
    generation: AtomicU64,
    arrived: Notify,
    /// Sessions someone waits for ([`Self::wait`]), with how many wait: a session still in its
    /// pass-through window is held at once when wanted ([`Self::wanted`]), since only a held
    /// session has an inner client the router can use.
    waiting_for: DashMap<String, usize>,
    wanted: Notify,
}

/// Counts one waiter for a session while alive.
struct Want<'a> {
    directory: &'a Directory,
    uuid: &'a str,
}

impl Drop for Want<'_> {
    fn drop(&mut self) {
        self.directory
            .waiting_for
            .remove_if_mut(self.uuid, |_, waiters| {
                *waiters -= 1;
                *waiters == 0
            });
    }
}

/// Keeps a session listed while alive.
pub struct Registration {
    directory: Arc<Directory>,
    uuid: String,
    generation: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.directory
            .entries
            .remove_if(&self.uuid, |_, e| e.generation == self.generation);
    }
}

impl Directory {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Lists the session `uuid` until the returned guard is dropped. A later registration of the
    /// same uuid replaces this one.
    pub fn register(
        self: &Arc<Self>,
        uuid: &str,
        send: h2::client::SendRequest<Bytes>,
        methods: Vec<String>,
    ) -> Registration {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        self.entries.insert(
            uuid.to_owned(),
            Entry {
                client: InnerClient {
                    send,
                    methods: methods.into(),
                },
                generation,
            },
        );
        self.arrived.notify_waiters();
        Registration {
            directory: self.clone(),
            uuid: uuid.to_owned(),
            generation,
        }
    }

    /// The session's inner client, if it is listed now.
    pub fn get(&self, uuid: &str) -> Option<InnerClient> {
        self.entries.get(uuid).map(|e| e.client.clone())
    }

    /// The session's inner client, waiting until `deadline` for the session to arrive (a Solve
    /// can reach the router before the Session it names).
    pub async fn wait(&self, uuid: &str, deadline: Instant) -> Option<InnerClient> {
        if let Some(client) = self.get(uuid) {
            return Some(client);
        }
        *self.waiting_for.entry(uuid.to_owned()).or_default() += 1;
        let _want = Want {
            directory: self,
            uuid,
        };
        self.wanted.notify_waiters();
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(client) = self.get(uuid) {
                return Some(client);
            }
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Resolves once something waits for the session `uuid`'s inner client ([`Self::wait`]).
    pub async fn wanted(&self, uuid: &str) {
        loop {
            let wanted = self.wanted.notified();
            tokio::pin!(wanted);
            wanted.as_mut().enable();
            if self.waiting_for.contains_key(uuid) {
                return;
            }
            wanted.await;
        }
    }

    /// Sessions listed now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn sender() -> (h2::client::SendRequest<Bytes>, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(1024);
        let (send, conn) = h2::client::handshake(a).await.expect("handshake");
        tokio::spawn(conn);
        (send, b)
    }

    #[tokio::test]
    async fn a_session_arriving_late_is_found_and_a_dropped_one_is_gone() {
        let directory = Directory::new();
        let (send, _peer) = sender().await;
        let waiter = {
            let directory = directory.clone();
            tokio::spawn(async move {
                directory
                    .wait("s1", Instant::now() + Duration::from_secs(5))
                    .await
                    .map(|c| c.serves("/moby.filesync.v1.FileSync/DiffCopy"))
            })
        };
        tokio::task::yield_now().await;
        let registration = directory.register(
            "s1",
            send.clone(),
            vec!["/moby.filesync.v1.FileSync/DiffCopy".into()],
        );
        assert_eq!(waiter.await.unwrap(), Some(true));
        // Replaced by a newer registration: dropping the old guard keeps the new entry.
        let newer = directory.register("s1", send, vec![]);
        drop(registration);
        assert!(directory.get("s1").is_some_and(|c| !c.serves("/x/Y")));
        drop(newer);
        assert!(directory.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_session_that_never_comes_ends_at_the_deadline() {
        let directory = Directory::new();
        let started = Instant::now();
        assert!(directory
            .wait("nobody", started + Duration::from_millis(300))
            .await
            .is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert!(
            directory.waiting_for.is_empty(),
            "the want ends with the wait"
        );
    }

    /// A session deciding whether to pass through learns that its inner client is wanted,
    /// whether the wait began before or after it asked.
    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_session_is_seen_by_the_session_whenever_it_began() {
        let directory = Directory::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        let later = {
            let directory = directory.clone();
            tokio::spawn(async move { directory.wanted("s1").await })
        };
        tokio::task::yield_now().await;
        assert!(!later.is_finished());
        let waiting = {
            let directory = directory.clone();
            tokio::spawn(async move { directory.wait("s1", deadline).await.is_none() })
        };
        later.await.expect("the session learns it is wanted");
        // Already wanted: seen at once.
        directory.wanted("s1").await;
        assert!(waiting.await.unwrap());
        assert!(directory.waiting_for.is_empty());
        assert!(
            tokio::time::timeout(Duration::from_secs(1), directory.wanted("s1"))
                .await
                .is_err(),
            "nobody waits any more"
        );
    }
}
