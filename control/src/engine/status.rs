//! `status`: the documents in force and rejected, the proxies and the store, as the
//! management API shows them.

use std::collections::BTreeSet;

use super::proxies::proxy_statuses;
use super::{Engine, DEFAULTS};
use crate::api::{now_ms, DocumentStatus, Status};
use crate::store::Source;

impl Engine {
    /// Documents, rejections and proxies.
    pub fn status(&self) -> Status {
        let inner = self.lock();
        let mut names: BTreeSet<&String> = inner.docs.keys().collect();
        names.extend(inner.state.rejections.documents());
        let documents = names
            .into_iter()
            .map(|name| {
                let doc = inner.docs.get(name);
                DocumentStatus {
                    name: name.clone(),
                    source: doc.map(|d| {
                        match d.source {
                            Source::File => "file",
                            Source::Api => "api",
                        }
                        .to_string()
                    }),
                    changed_at: doc.map(|d| d.changed_at),
                    rejected: inner.state.rejections.get(name).cloned(),
                    workloads: inner
                        .parsed
                        .get(name)
                        .map(|p| match &p.workload {
                            Some(selector) if !selector.is_all() => selector.names().to_vec(),
                            _ => vec![DEFAULTS.to_string()],
                        })
                        .unwrap_or_default(),
                    overrides_file: doc.is_some_and(|d| d.source == Source::Api)
                        && inner.shadowed.contains_key(name),
                    file_differs: doc.is_some_and(|d| {
                        d.source == Source::Api
                            && inner.shadowed.get(name).is_some_and(|t| *t != d.text)
                    }),
                }
            })
            .collect();
        let proxies = proxy_statuses(&inner);
        Status {
            version: inner.state.version,
            documents,
            proxies,
            store: Some(inner.store_health.status(&self.store.describe())),
            certificates: None,
            now_ms: now_ms(),
            replica: None,
        }
    }
}
