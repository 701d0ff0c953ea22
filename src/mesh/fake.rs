//! A mesh provider for tests of the real binary. Only a `test-fakes` build can select it
//! (`[network] provider = "fake"`); release builds and packages do not contain it.

use std::time::Duration;

use super::{BoxFuture, Joined, MeshError, MeshProvider, MeshStatus, ServiceAd};
use crate::config::Config;

#[derive(Debug, Default)]
pub struct FakeMesh {
    joins: u32,
    publish_fail: bool,
    published: Vec<String>,
}

impl MeshProvider for FakeMesh {
    fn join<'a>(&'a mut self, config: &'a Config) -> BoxFuture<'a, Result<Joined, MeshError>> {
        Box::pin(async move {
            let fake = &config.network.fake;
            self.joins += 1;
            self.publish_fail = fake.publish_fail;
            if fake.join_delay > Duration::ZERO {
                tokio::time::sleep(fake.join_delay).await;
            }
            if fake.always_fail || self.joins <= fake.fail_joins {
                return Err(MeshError::transient(fake.fail_message.clone()));
            }
            Ok(Joined {
                status: MeshStatus {
                    provider: "fake".into(),
                    interface: Some("fake0".into()),
                    address: Some(fake.address.clone()),
                    peers: 0,
                    problems: Vec::new(),
                    gateway: None,
                },
                node_info: None,
            })
        })
    }

    fn publish<'a>(
        &'a mut self,
        services: &'a [ServiceAd],
    ) -> BoxFuture<'a, Result<(), MeshError>> {
        Box::pin(async move {
            if self.joins == 0 {
                return Err(MeshError::transient("publish before join"));
            }
            if self.publish_fail {
                return Err(MeshError::transient("fake mesh refused to publish"));
            }
            self.published = services.iter().map(|s| s.name.clone()).collect();
            tracing::info!(component = "mesh", services = ?self.published, "fake mesh published services");
            Ok(())
        })
    }

    fn withdraw(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            let withdrawn = std::mem::take(&mut self.published);
            tracing::info!(component = "mesh", services = ?withdrawn, "fake mesh withdrew services");
            Ok(())
        })
    }

    fn leave(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
        Box::pin(async move {
            tracing::info!(component = "mesh", "fake mesh left");
            Ok(())
        })
    }
}
