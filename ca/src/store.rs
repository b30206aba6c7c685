//! The CA's state in the API: its Secret (the only place the signing key lives) and the bundle
//! ConfigMap node daemons read. Replicas hold nothing else, so any number agree.

use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use tracing::info;

use crate::authority::Material;

/// The bundle ConfigMap's keys: the bundle under [`culvert_ca_proto::ROOT_CERT_KEY`], and the
/// SHA-256 of the current signing certificate: a change tells node daemons to re-issue.
pub const SIGNER_KEY: &str = "signer";

/// Where the CA keeps its state.
#[derive(Clone)]
pub struct Store {
    pub secrets: Api<Secret>,
    pub config_maps: Api<ConfigMap>,
    pub secret: String,
    pub bundle: String,
}

impl Store {
    pub fn new(client: &kube::Client, namespace: &str, secret: &str, bundle: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client.clone(), namespace),
            secret: secret.to_owned(),
            bundle: bundle.to_owned(),
        }
    }

    /// Reads the CA Secret; creates it with a fresh root when absent. Two replicas starting at
    /// once both try; the apiserver keeps the first and the other reads it.
    pub async fn load_or_create(&self, trust_domain: &str) -> anyhow::Result<Material> {
        if let Some(material) = self.load().await? {
            return Ok(material);
        }
        let material = Material::generate(trust_domain)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.secret.clone()),
                ..Default::default()
            },
            data: Some(encode(&material.to_data())),
            ..Default::default()
        };
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(secret = self.secret, "created the CA with a new root");
                Ok(material)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                info!(
                    secret = self.secret,
                    "another replica created the CA first; using its"
                );
                self.load().await?.context("the CA Secret vanished")
            }
            Err(e) => Err(e).context("creating the CA Secret"),
        }
    }

    /// The CA Secret's material, if the Secret exists.
    pub async fn load(&self) -> anyhow::Result<Option<Material>> {
        let Some(secret) = self
            .secrets
            .get_opt(&self.secret)
            .await
            .context("reading the CA Secret")?
        else {
            return Ok(None);
        };
        Ok(Some(material_of(&secret)?))
    }

    /// Writes the material back (a rotation step), failing if someone else changed the
    /// Secret since `resource_version`.
    pub async fn save(&self, material: &Material, resource_version: String) -> anyhow::Result<()> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.secret.clone()),
                resource_version: Some(resource_version),
                ..Default::default()
            },
            data: Some(encode(&material.to_data())),
            ..Default::default()
        };
        self.secrets
            .replace(&self.secret, &PostParams::default(), &secret)
            .await
            .context("updating the CA Secret")?;
        Ok(())
    }

    /// Publishes the trust bundle and the current signer for node daemons (server-side apply:
    /// every replica writes the same content).
    pub async fn publish(&self, material: &Material) -> anyhow::Result<()> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.bundle.clone()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (
                    culvert_ca_proto::ROOT_CERT_KEY.to_owned(),
                    material.roots_pem.clone(),
                ),
                (SIGNER_KEY.to_owned(), material.current.fingerprint()?),
            ])),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&cm)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "ConfigMap".into();
        self.config_maps
            .patch(
                &self.bundle,
                &PatchParams::apply("culvert-ca").force(),
                &Patch::Apply(value),
            )
            .await
            .context("publishing the trust bundle ConfigMap")?;
        Ok(())
    }
}

pub fn material_of(secret: &Secret) -> anyhow::Result<Material> {
    let data: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| Ok((k.clone(), String::from_utf8(v.0.clone())?)))
        .collect::<anyhow::Result<_>>()
        .context("the CA Secret holds non-UTF-8 data")?;
    Material::from_data(&data).context("the CA Secret")
}

fn encode(data: &BTreeMap<String, String>) -> BTreeMap<String, ByteString> {
    data.iter()
        .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
        .collect()
}
