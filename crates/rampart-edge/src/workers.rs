//! The worker runtimes of the per-core model (`server.runtime = "per_core"`): one
//! thread each, running a current-thread tokio runtime until stopped. The edge
//! binds its listeners in them and serves there what they accept
//! ([`crate::Edge::start_on`]).

use tokio::runtime::Handle;

pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Start `n` worker threads (`rampart-worker-<i>`), each with its runtime.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut w = Workers {
            handles: Vec::with_capacity(n),
            stops: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("rampart-worker-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(rt.handle().clone()));
                    // Until stopped; dropping the runtime then ends what is left on it.
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            w.threads.push(thread);
            w.stops.push(stop_tx);
            let handle = ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("a worker thread ended before its runtime started"))??;
            w.handles.push(handle);
        }
        Ok(w)
    }

    /// The runtimes' handles, for [`crate::Edge::start_on`].
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }
}

impl Drop for Workers {
    /// Stop every runtime and join its thread.
    fn drop(&mut self) {
        self.stops.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
