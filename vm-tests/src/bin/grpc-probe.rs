//! `grpc-probe URL [SERVICE]`: one `grpc.health.v1.Health/Check` call over h2c (tonic), as an
//! unmodified gRPC app makes it. Prints `SERVING` (or the serving status name) and exits 0,
//! or prints `ERROR <code> <message>` and exits 1. Tests run it inside the test cgroup with
//! URL `http://NAME.svc`, so the call goes through the mesh. Bounded: 10 s overall.

use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let Some(url) = args.next() else {
        eprintln!("usage: grpc-probe URL [SERVICE]");
        std::process::exit(2);
    };
    let service = args.next().unwrap_or_default();
    match tokio::time::timeout(Duration::from_secs(10), check(url, service)).await {
        Ok(Ok(status)) => println!("{status}"),
        Ok(Err(status)) => {
            println!("ERROR {:?} {}", status.code(), status.message());
            std::process::exit(1);
        }
        Err(_) => {
            println!("ERROR timeout no answer within 10 s");
            std::process::exit(1);
        }
    }
}

async fn check(url: String, service: String) -> Result<String, tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(8));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await?
        .into_inner();
    Ok(ServingStatus::try_from(reply.status)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("UNKNOWN({})", reply.status)))
}
