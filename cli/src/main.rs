//! `cepheid`: thin entry point over [`cepheid_cli`].

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Behave like other Unix tools when the reader goes away (`cepheid ... | head`).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Warnings of the libraries (delivery retries, Redis reconnects) and the
    // `log` alert target go to stderr as text.
    let _ = cepheid_telemetry::init_logs(&cepheid_telemetry::TelemetrySettings { log_level: "warn,cepheid_alert=info".into(), ..Default::default() });
    let cli = cepheid_cli::Cli::parse();
    match cepheid_cli::main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
