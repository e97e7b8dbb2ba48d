//! Starting the ingest service in-process for the tests.

use cepheid_bus::Bus;
use cepheid_ingest::ledger::PostLedger;
use cepheid_ingest::{run, IngestConfig};

pub struct Server {
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Ingest on a port of its own, answering (its topics created) when this returns.
pub async fn start(cfg: IngestConfig, bus: Bus, ledger: PostLedger) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(cfg, bus, Default::default(), listener, ledger, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    Server { url, stop, task }
}

impl Server {
    /// Shuts down cleanly; fails the test if the service failed.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}
