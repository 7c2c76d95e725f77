//! Reading custom resources leniently: an object whose spec does not deserialize (a value or
//! field from a newer CRD, an edit that bypassed validation) is kept as [`Unreadable`] with the
//! field path, instead of failing the whole watch, so every other policy keeps being rendered and
//! the object itself gets a status and an event that say what is wrong.

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

/// Why an object could not be read: the first field that did not fit, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    /// Dotted path (`spec.action`, `spec.destinations[0].ports[1]`).
    pub path: String,
    pub message: String,
}

/// An object of kind `K` as the API server holds it: typed when it deserializes.
#[derive(Debug, Clone)]
pub struct Lenient<K> {
    meta: ObjectMeta,
    pub read: Result<Arc<K>, Unreadable>,
}

impl<K> Lenient<K> {
    pub fn meta_data(&self) -> &ObjectMeta {
        &self.meta
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        // Metadata must read (without a name there is nothing to report on).
        let meta: ObjectMeta = match value.get("metadata") {
            Some(m) => ObjectMeta::deserialize(m).map_err(D::Error::custom)?,
            None => ObjectMeta::default(),
        };
        let read = serde_path_to_error::deserialize::<_, K>(&value)
            .map(Arc::new)
            .map_err(|e| Unreadable { path: e.path().to_string(), message: e.into_inner().to_string() });
        Ok(Lenient { meta, read })
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::TunnelPolicy;
    use serde_json::json;

    #[test]
    fn an_object_that_does_not_fit_keeps_its_metadata_and_names_the_field() {
        let good = json!({"apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy",
            "metadata": {"name": "ok", "namespace": "a", "generation": 2},
            "spec": {"podSelector": {}, "action": "Allow", "destinations": [{"hosts": ["x.test"]}]}});
        let l: Lenient<TunnelPolicy> = serde_json::from_value(good).unwrap();
        assert!(l.read.is_ok());
        let mut newer = json!({"apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy",
            "metadata": {"name": "newer", "namespace": "a", "generation": 3},
            "spec": {"podSelector": {}, "action": "Permit", "destinations": [{"hosts": ["x.test"]}]}});
        let l: Lenient<TunnelPolicy> = serde_json::from_value(newer.clone()).unwrap();
        let why = l.read.clone().unwrap_err();
        assert_eq!(why.path, "spec.action");
        assert!(why.message.contains("Permit"), "{}", why.message);
        assert_eq!((l.meta().name.as_deref(), l.meta().generation), (Some("newer"), Some(3)));
        newer["spec"]["destinations"][0]["hosts"] = json!("x.test");
        newer["spec"]["action"] = json!("Allow");
        let l: Lenient<TunnelPolicy> = serde_json::from_value(newer).unwrap();
        assert_eq!(l.read.unwrap_err().path, "spec.destinations[0].hosts");
        assert_eq!(<Lenient<TunnelPolicy> as Resource>::plural(&()), "tunnelpolicies");
    }
}
