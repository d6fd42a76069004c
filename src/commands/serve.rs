//! `sluice serve PIPELINE`: Lambda's Invoke API over HTTP, for AWS SDKs
//! and the AWS CLI (see `sluice_ingest::invoke_api`).

use std::path::PathBuf;

use crate::exit;

/// `sluice serve`'s command line.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The pipeline file declaring the functions.
    pub pipeline: PathBuf,
    /// Address to listen on. Requests are not authenticated: keep it on
    /// loopback unless the network is yours.
    #[arg(long, default_value = "127.0.0.1:3001")]
    pub addr: String,
    /// Do not print the functions' log lines.
    #[arg(long, short)]
    pub quiet: bool,
    /// Retries of a failed asynchronous (`Event`) call, 0 to 2 (Lambda's
    /// `MaximumRetryAttempts`).
    #[arg(long, default_value_t = sluice_ingest::invoke_api::MAX_RETRY_ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(0..=2))]
    pub max_retry_attempts: u32,
    /// How old an asynchronous call may grow before it is given up
    /// (Lambda's `MaximumEventAgeInSeconds`): 60s to 6h.
    #[arg(long, default_value = "6h", value_parser = event_age)]
    pub max_event_age: std::time::Duration,
    /// A JSON-lines file where asynchronous calls that failed for good (or
    /// grew too old) are recorded (appended), in Lambda's destination
    /// record format: `requestContext`, `requestPayload`, `responsePayload`.
    #[arg(long, value_name = "FILE")]
    pub on_failure: Option<PathBuf>,
    /// A JSON-lines file where asynchronous calls that succeeded are
    /// recorded, likewise (Lambda's `OnSuccess` destination).
    #[arg(long, value_name = "FILE")]
    pub on_success: Option<PathBuf>,
}

/// `--max-event-age`: a duration from 60 s to 6 h, as Lambda allows.
fn event_age(text: &str) -> Result<std::time::Duration, String> {
    let age = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if age < std::time::Duration::from_secs(60) || age > sluice_ingest::invoke_api::MAX_EVENT_AGE {
        return Err(format!("{text:?}: expected 60s to 6h"));
    }
    Ok(age)
}

/// Serves until SIGINT/SIGTERM, then lets requests and accepted `Event`
/// calls finish; exit 0, 2 for a bad pipeline or address, 3 when the
/// sandboxes cannot be set up.
pub async fn run(args: ServeArgs) -> u8 {
    let p = match super::load_pipeline(&args.pipeline) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let ex = match super::executor_for(&p, crate::logs::function_log_sink(args.quiet)) {
        Ok(ex) => ex,
        Err(e) => {
            crate::log_error!("{e:#}");
            return exit::INVOKE_FAILED;
        }
    };
    let listener = match tokio::net::TcpListener::bind(&args.addr).await {
        Ok(l) => l,
        Err(e) => {
            crate::log_error!("--addr {}: {e}", args.addr);
            return exit::USAGE;
        }
    };
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let names: Vec<&str> = p.functions.keys().map(String::as_str).collect();
    crate::log_note!(
        "Lambda Invoke API at http://{bound} (functions: {}); e.g. aws lambda invoke --endpoint-url http://{bound} --function-name {} --payload '{{}}' --cli-binary-format raw-in-base64-out out.json",
        names.join(", "),
        names.first().unwrap_or(&"NAME")
    );
    for (flag, file) in [
        ("--on-failure", &args.on_failure),
        ("--on-success", &args.on_success),
    ] {
        if let Some(path) = file
            && let Err(e) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            crate::log_error!("{flag} {}: {e}", path.display());
            return exit::USAGE;
        }
    }
    let config = sluice_ingest::invoke_api::AsyncConfig {
        max_retry_attempts: args.max_retry_attempts,
        max_event_age: args.max_event_age,
        on_failure: args.on_failure.clone(),
        on_success: args.on_success.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let maintenance = ex.spawn_maintenance(stop_rx);
    let served = sluice_ingest::invoke_api::serve(listener, ex.clone(), config, async {
        super::stop_requested().await;
        crate::log_note!("stopping: finishing requests and accepted asynchronous calls");
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = maintenance.await;
    ex.shutdown().await;
    match served {
        Ok(()) => exit::OK,
        Err(e) => {
            crate::log_error!("invoke API: {e}");
            exit::INVOKE_FAILED
        }
    }
}
