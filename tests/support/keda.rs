//! A client of KEDA's external scaler API (`externalscaler.ExternalScaler`) that calls it as
//! KEDA's operator does: a ScaledObject's ref with the trigger's metadata.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use buildkit_router::proto::externalscaler::external_scaler_client::ExternalScalerClient;
use buildkit_router::proto::externalscaler::{
    GetMetricsRequest, IsActiveResponse, ScaledObjectRef,
};
use buildkit_router::scaler::METRIC_NAME;
use tonic::transport::Channel;
use tonic::Streaming;

use super::client::Client;

/// What KEDA's external scaler client does.
pub struct Keda {
    pub client: ExternalScalerClient<Channel>,
}

impl Keda {
    pub async fn connect(addr: SocketAddr) -> Keda {
        let client = Client::connect(addr).await.expect("connect to the scaler");
        Keda {
            client: ExternalScalerClient::new(client.channel()),
        }
    }

    /// Over TLS, as KEDA with a TriggerAuthentication's `caCert` (and `tlsClientCert`).
    pub async fn connect_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Keda {
        let client = Client::connect_tls(addr, config, "localhost")
            .await
            .expect("connect to the scaler over TLS");
        Keda {
            client: ExternalScalerClient::new(client.channel()),
        }
    }

    pub fn object() -> ScaledObjectRef {
        ScaledObjectRef {
            name: "buildkitd".into(),
            namespace: "buildkit".into(),
            scaler_metadata: [("scalerAddress".to_owned(), "router:6000".to_owned())].into(),
        }
    }

    pub async fn is_active(&mut self) -> bool {
        self.client
            .is_active(Self::object())
            .await
            .expect("IsActive")
            .into_inner()
            .result
    }

    pub async fn stream(&mut self) -> Streaming<IsActiveResponse> {
        self.client
            .stream_is_active(Self::object())
            .await
            .expect("StreamIsActive")
            .into_inner()
    }

    pub async fn metric(&mut self) -> i64 {
        let values = self
            .client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(Self::object()),
                metric_name: METRIC_NAME.into(),
            })
            .await
            .expect("GetMetrics")
            .into_inner()
            .metric_values;
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].metric_name, METRIC_NAME);
        values[0].metric_value
    }
}

/// The next pushed state, bounded.
pub async fn next_push(stream: &mut Streaming<IsActiveResponse>) -> bool {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("no push within 20 s")
        .expect("stream alive")
        .expect("stream open")
        .result
}
