//! Peer endpoint names, looked up together with one deadline.
//!
//! Each lookup runs `getaddrinfo` on a thread of its own that nothing joins: a name whose DNS
//! server never answers delays a reconcile by at most `RESOLVE_TIMEOUT`, and delays neither a
//! stop nor the runtime's shutdown (which would wait for a blocking-pool task). A lookup still
//! running from an earlier reconcile is neither started again nor waited for; its answer is
//! kept for the next one. A name that does not answer keeps its last address.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::Endpoint;

/// How long a reconcile waits for endpoint names, all lookups together.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// At most this many lookup threads at once; names beyond it wait for a later reconcile.
const MAX_LOOKUPS: usize = 64;

type LookupFn = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Name {
    host: String,
    port: u16,
}

#[derive(Default)]
struct Shared {
    in_flight: BTreeSet<Name>,
    last: HashMap<Name, SocketAddr>,
}

pub struct Resolver {
    lookup: Arc<LookupFn>,
    timeout: Duration,
    shared: Arc<Mutex<Shared>>,
}

impl Default for Resolver {
    fn default() -> Self {
        Self::with_lookup(RESOLVE_TIMEOUT, |host, port| {
            Ok((host, port).to_socket_addrs()?.collect())
        })
    }
}

/// One endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The address to use: this lookup's, or the last one found if it failed.
    pub addr: Option<SocketAddr>,
    /// Why this lookup found nothing, if it did not.
    pub problem: Option<String>,
}

impl Resolver {
    /// A resolver with its own blocking lookup and deadline (tests).
    pub fn with_lookup(
        timeout: Duration,
        lookup: impl Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            lookup: Arc::new(lookup),
            timeout,
            shared: Arc::default(),
        }
    }

    /// The address of each endpoint; literal addresses need no lookup.
    pub async fn resolve<'a>(
        &self,
        endpoints: impl IntoIterator<Item = &'a Endpoint>,
    ) -> HashMap<Endpoint, Answer> {
        let mut answers = HashMap::new();
        let mut waiting = Vec::new();
        let mut names = BTreeMap::new();
        for endpoint in endpoints {
            if let Ok(ip) = endpoint.host().parse::<IpAddr>() {
                let answer = Answer {
                    addr: Some(SocketAddr::new(ip, endpoint.port())),
                    problem: None,
                };
                answers.insert(endpoint.clone(), answer);
                continue;
            }
            let name = Name {
                host: endpoint.host().to_string(),
                port: endpoint.port(),
            };
            names.insert(name, endpoint.clone());
        }
        {
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            // Forget names no longer configured.
            shared.last.retain(|name, _| names.contains_key(name));
        }
        if !names.is_empty() {
            tracing::debug!(
                component = "mesh",
                names = names.len(),
                "resolving peer endpoint names"
            );
        }
        for (name, endpoint) in &names {
            match self.start(name) {
                Ok(rx) => waiting.push((endpoint.clone(), rx)),
                Err(why) => {
                    answers.insert(endpoint.clone(), self.fallback(name, why));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timeout = self.timeout;
        let replies = futures::future::join_all(waiting.into_iter().map(|(endpoint, rx)| async {
            let reply = tokio::time::timeout_at(deadline, rx).await;
            (endpoint, reply)
        }))
        .await;
        for (endpoint, reply) in replies {
            let name = Name {
                host: endpoint.host().to_string(),
                port: endpoint.port(),
            };
            let answer = match reply {
                Ok(Ok(Ok(addrs))) if !addrs.is_empty() => Answer {
                    addr: addrs.first().copied(),
                    problem: None,
                },
                Ok(Ok(Ok(_))) => self.fallback(&name, "no address found".into()),
                Ok(Ok(Err(error))) => self.fallback(&name, error.to_string()),
                Ok(Err(_)) => self.fallback(&name, "the lookup thread ended".into()),
                Err(_) => self.fallback(
                    &name,
                    format!("no answer within {} s", timeout.as_secs_f32()),
                ),
            };
            answers.insert(endpoint, answer);
        }
        answers
    }

    /// Start a lookup of `name` on its own thread, unless one is running already.
    fn start(&self, name: &Name) -> Result<oneshot::Receiver<io::Result<Vec<SocketAddr>>>, String> {
        {
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            if shared.in_flight.contains(name) {
                return Err("still waiting for the lookup an earlier reconcile started".into());
            }
            if shared.in_flight.len() >= MAX_LOOKUPS {
                return Err(format!(
                    "{MAX_LOOKUPS} lookups are running already; tried again at the next reconcile"
                ));
            }
            shared.in_flight.insert(name.clone());
        }
        let (tx, rx) = oneshot::channel();
        let lookup = Arc::clone(&self.lookup);
        let shared = Arc::clone(&self.shared);
        let thread_name = name.clone();
        let spawned = std::thread::Builder::new()
            .name("clawnode-resolve".into())
            .spawn(move || {
                let name = thread_name;
                let result = lookup(&name.host, name.port);
                {
                    let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    shared.in_flight.remove(&name);
                    if let Ok(Some(addr)) = result.as_ref().map(|a| a.first()) {
                        shared.last.insert(name, *addr);
                    }
                }
                let _ = tx.send(result);
            });
        if let Err(error) = spawned {
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            shared.in_flight.remove(name);
            return Err(format!("cannot start a lookup thread: {error}"));
        }
        Ok(rx)
    }

    /// No fresh answer for `name`: its last address, if any, and why.
    fn fallback(&self, name: &Name, why: String) -> Answer {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let addr = shared.last.get(name).copied();
        let problem = match addr {
            Some(addr) => format!("not resolved ({why}); keeping its last address {addr}"),
            None => format!("not resolved ({why}); retried at the next reconcile"),
        };
        Answer {
            addr,
            problem: Some(problem),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    fn endpoint(s: &str) -> Endpoint {
        s.parse().unwrap()
    }

    /// "stuck.example" blocks until the test sends it an answer (or drops the sender);
    /// every other name answers 192.0.2.<length of its host> at once.
    struct Dns {
        resolver: Resolver,
        stuck_lookups: Arc<AtomicUsize>,
        answer: mpsc::Sender<SocketAddr>,
    }

    fn dns(timeout: Duration) -> Dns {
        let (answer, answers) = mpsc::channel::<SocketAddr>();
        let answers = Arc::new(Mutex::new(answers));
        let stuck_lookups = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&stuck_lookups);
        let resolver = Resolver::with_lookup(timeout, move |host, port| {
            if host == "stuck.example" {
                count.fetch_add(1, Ordering::SeqCst);
                let addr = answers.lock().unwrap().recv().map_err(io::Error::other)?;
                return Ok(vec![addr]);
            }
            Ok(vec![SocketAddr::new(
                IpAddr::from([192, 0, 2, host.len() as u8]),
                port,
            )])
        });
        Dns {
            resolver,
            stuck_lookups,
            answer,
        }
    }

    #[tokio::test]
    async fn a_name_that_never_answers_delays_the_others_by_at_most_the_timeout() {
        let dns = dns(Duration::from_millis(300));
        let endpoints = [
            endpoint("stuck.example:51820"),
            endpoint("a.example:51820"),
            endpoint("bb.example:51821"),
            endpoint("198.51.100.7:51820"),
        ];

        let started = Instant::now();
        let answers = dns.resolver.resolve(&endpoints).await;
        let took = started.elapsed();

        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(
            answers[&endpoints[1]].addr,
            Some("192.0.2.9:51820".parse().unwrap())
        );
        assert_eq!(
            answers[&endpoints[2]].addr,
            Some("192.0.2.10:51821".parse().unwrap())
        );
        assert_eq!(
            answers[&endpoints[3]],
            Answer {
                addr: Some("198.51.100.7:51820".parse().unwrap()),
                problem: None
            }
        );
        let stuck = &answers[&endpoints[0]];
        assert_eq!(stuck.addr, None);
        assert_eq!(
            stuck.problem.as_deref(),
            Some("not resolved (no answer within 0.3 s); retried at the next reconcile")
        );
    }

    #[tokio::test]
    async fn a_lookup_still_running_is_not_started_or_waited_for_again_and_its_answer_is_kept() {
        let dns = dns(Duration::from_millis(200));
        let stuck = [endpoint("stuck.example:51820")];
        dns.resolver.resolve(&stuck).await;

        let started = Instant::now();
        let again = dns.resolver.resolve(&stuck).await;
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(dns.stuck_lookups.load(Ordering::SeqCst), 1);
        assert!(
            again[&stuck[0]]
                .problem
                .as_deref()
                .unwrap()
                .contains("an earlier reconcile"),
            "{again:?}"
        );

        // The first lookup answers late; the next reconcile looks again, that lookup hangs,
        // and the late answer stands in for it.
        dns.answer
            .send("203.0.113.5:51820".parse().unwrap())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while dns.resolver.shared.lock().unwrap().in_flight.len() == 1 {
            assert!(Instant::now() < deadline, "the late answer never landed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let later = dns.resolver.resolve(&stuck).await;
        assert_eq!(dns.stuck_lookups.load(Ordering::SeqCst), 2);
        assert_eq!(
            later[&stuck[0]].addr,
            Some("203.0.113.5:51820".parse().unwrap())
        );
        assert!(
            later[&stuck[0]]
                .problem
                .as_deref()
                .unwrap()
                .contains("keeping its last address 203.0.113.5:51820"),
            "{later:?}"
        );
    }

    #[tokio::test]
    async fn address_literals_need_no_lookup() {
        let dns = dns(Duration::from_secs(30));
        let endpoints = [endpoint("[2001:db8::1]:51820"), endpoint("192.0.2.1:1")];
        let started = Instant::now();
        let answers = dns.resolver.resolve(&endpoints).await;
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(
            answers[&endpoints[0]].addr,
            Some("[2001:db8::1]:51820".parse().unwrap())
        );
        assert_eq!(dns.stuck_lookups.load(Ordering::SeqCst), 0);
    }
}
