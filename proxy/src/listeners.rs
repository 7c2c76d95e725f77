//! Running listeners, for the first load and every reload alike: planning a new set against the
//! running one (keep, hand a socket over to a renamed listener, or bind), switching to it, and
//! starting one accept loop per listener.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use proxy_config::Listener;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::accept;
use crate::control::RunningListener;
use crate::state::Inner;
use crate::sync::lock;

/// How each listener of the new document is served.
pub(crate) enum Plan {
    /// Same name and address: the running accept loop stays.
    Keep(usize),
    /// Same address, other name: the old socket is handed over (no refused-connection window).
    Reuse(usize),
    /// A new address: bound before anything changes.
    Bind(TcpListener),
}

/// A listener's address could not be bound (at start or at a reload); nothing running was changed.
#[derive(Debug, thiserror::Error)]
#[error("listeners[{index}] ({name}): cannot bind {addr}")]
pub struct BindError {
    pub index: usize,
    pub name: String,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Plans `new` against the running listeners, binding the new addresses; changes nothing running.
pub(crate) async fn plan(inner: &Inner, new: &[Listener]) -> Result<Vec<Plan>, BindError> {
    let old: Vec<(String, SocketAddr)> =
        lock(&inner.control.listeners).iter().map(|l| (l.name.clone(), l.bind)).collect();
    let mut claimed = HashSet::new();
    let mut plans = Vec::new();
    for (index, l) in new.iter().enumerate() {
        let keep = old.iter().position(|(n, b)| *n == l.name && *b == l.bind);
        let reuse = || {
            old.iter().enumerate().position(|(i, (_, b))| *b == l.bind && l.bind.port() != 0 && !claimed.contains(&i))
        };
        let plan = match keep {
            Some(i) => Plan::Keep(i),
            None => match reuse() {
                Some(i) => Plan::Reuse(i),
                None => {
                    let sock = TcpListener::bind(l.bind).await.map_err(|source| BindError {
                        index,
                        name: l.name.clone(),
                        addr: l.bind,
                        source,
                    })?;
                    Plan::Bind(sock)
                }
            },
        };
        if let Plan::Keep(i) | Plan::Reuse(i) = plan {
            claimed.insert(i);
        }
        plans.push(plan);
    }
    Ok(plans)
}

/// Switches to `new`: stops the listeners no plan keeps (their connections go on), hands their
/// sockets to renamed listeners, and starts the new accept loops.
pub(crate) async fn apply(inner: &Arc<Inner>, new: &[Listener], plans: Vec<Plan>) {
    let mut stopping: Vec<(usize, RunningListener)> = Vec::new();
    {
        let mut running = lock(&inner.control.listeners);
        let all: Vec<RunningListener> = std::mem::take(&mut *running);
        for (i, l) in all.into_iter().enumerate() {
            let kept = plans.iter().any(|p| matches!(p, Plan::Keep(k) if *k == i));
            if kept {
                running.push(l);
            } else {
                l.stop.cancel();
                stopping.push((i, l));
            }
        }
    }
    let mut returned = Vec::new();
    for (i, l) in stopping {
        match l.task.await {
            Ok(sock) => returned.push((i, sock)),
            Err(e) => warn!(listener = %l.name, error = %e, "accept loop ended abnormally"),
        }
        info!(listener = %l.name, addr = %l.addr, "listener stopped accepting");
    }
    for (l, plan) in new.iter().zip(plans) {
        let sock = match plan {
            Plan::Keep(_) => continue,
            Plan::Bind(sock) => sock,
            Plan::Reuse(i) => match returned.iter().position(|(j, _)| *j == i) {
                Some(pos) => returned.swap_remove(pos).1,
                None => continue,
            },
        };
        if let Err(e) = start(inner, &l.name, l.bind, sock) {
            warn!(listener = %l.name, error = %e, "cannot start listener");
        }
    }
    inner.refresh_own_endpoints();
}

/// Starts accepting on `sock` as listener `name`.
fn start(inner: &Arc<Inner>, name: &str, bind: SocketAddr, sock: TcpListener) -> std::io::Result<()> {
    let addr = sock.local_addr()?;
    // Accepted sockets inherit TCP_NODELAY from the listening socket (Linux copies it on
    // accept): one setsockopt per listener instead of one per connection.
    socket2::SockRef::from(&sock).set_tcp_nodelay(true)?;
    let stop = CancellationToken::new();
    info!(listener = %name, addr = %addr, "listening");
    inner.metrics.init_listener(name);
    let task = tokio::spawn(accept::run(inner.clone(), Arc::from(name), sock, stop.clone()));
    lock(&inner.control.listeners).push(RunningListener { name: name.to_owned(), bind, addr, stop, task });
    Ok(())
}
