//! A DNS server on 127.0.0.1 (UDP) speaking real DNS messages (hickory-proto), answering what
//! the test says: addresses, NXDOMAIN, an empty answer, SERVFAIL, or nothing at all.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// What the test DNS server answers.
#[derive(Clone, Debug)]
pub enum Behaviour {
    Addresses(Vec<std::net::Ipv4Addr>),
    NxDomain,
    /// NOERROR with no records: the name exists but has no addresses.
    NoRecords,
    ServFail,
    /// Never answers: the lookup times out.
    Silent,
}

/// The server; counts the A queries it received.
pub struct DnsServer {
    pub addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    queries: watch::Receiver<u64>,
}

impl DnsServer {
    pub async fn start(behaviour: Behaviour) -> Self {
        use hickory_proto::op::{Message, MessageType, ResponseCode};
        use hickory_proto::rr::{rdata, RData, Record, RecordType};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let (count_tx, queries) = watch::channel(0u64);
        let shared = behaviour.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(query) = request.queries().first().cloned() else {
                    continue;
                };
                if query.query_type() == RecordType::A {
                    count_tx.send_modify(|n| *n += 1);
                }
                let behaviour = shared.lock().unwrap().clone();
                let mut response = Message::new();
                response
                    .set_id(request.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(request.op_code())
                    .set_recursion_desired(request.recursion_desired())
                    .set_recursion_available(true)
                    .add_query(query.clone());
                match behaviour {
                    Behaviour::Silent => continue,
                    Behaviour::NxDomain => {
                        response.set_response_code(ResponseCode::NXDomain);
                    }
                    Behaviour::ServFail => {
                        response.set_response_code(ResponseCode::ServFail);
                    }
                    Behaviour::NoRecords => {}
                    Behaviour::Addresses(ips) => {
                        if query.query_type() == RecordType::A {
                            for ip in ips {
                                response.add_answer(Record::from_rdata(
                                    query.name().clone(),
                                    5,
                                    RData::A(rdata::A(ip)),
                                ));
                            }
                        }
                    }
                }
                let _ = socket.send_to(&response.to_vec().unwrap(), from).await;
            }
        });
        Self {
            addr,
            behaviour,
            queries,
        }
    }

    /// Switches the answer, then waits until two more lookups have been asked: the source has
    /// then acted on at least one full lookup under the new answer (it looks up one at a time).
    pub async fn answer(&mut self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
        let seen = *self.queries.borrow_and_update();
        tokio::time::timeout(
            Duration::from_secs(20),
            self.queries.wait_for(|n| *n >= seen + 2),
        )
        .await
        .expect("the DNS source stopped asking")
        .unwrap();
    }
}

impl DnsServer {
    /// Switches the answer without waiting for a lookup.
    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }
}
