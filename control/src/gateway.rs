//! Gateway API documents in the control plane's listings: a document is named by its file (or
//! `apply` name), and the HTTPRoutes and GRPCRoutes it holds are shown beside that name, so
//! `outriderctl history` and `status` read `canary.yaml (HTTPRoute shop/reviews)`.

use outrider_config::Policy;

/// `name`, followed by the Gateway API routes `policy` holds, if any.
pub fn describe(name: &str, policy: Option<&Policy>) -> String {
    let titles: Vec<String> = policy
        .map(|p| p.gateway.iter().map(|g| g.title()).collect())
        .unwrap_or_default();
    if titles.is_empty() {
        name.to_string()
    } else {
        format!("{name} ({})", titles.join(", "))
    }
}

/// [`describe`] for a document of a kept version: `current` is the document in force under
/// that name, whose text is compared so that an older text is read again rather than
/// described by the newer one's routes.
pub fn describe_version(name: &str, text: &str, current: Option<(&str, &Policy)>) -> String {
    match current {
        Some((current_text, policy)) if current_text == text => describe(name, Some(policy)),
        _ => describe(
            name,
            outrider_config::load_document(name, text)
                .ok()
                .map(|l| l.policy)
                .as_ref(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_is_named_with_its_routes() {
        let text = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: reviews, namespace: shop }
spec:
  parentRefs: [{ kind: Service, name: reviews }]
  rules: [{ backendRefs: [{ name: reviews-v1 }] }]
";
        let policy = outrider_config::load_document("r.yaml", text)
            .expect("valid")
            .policy;
        assert_eq!(
            describe("r.yaml", Some(&policy)),
            "r.yaml (HTTPRoute shop/reviews)"
        );
        assert_eq!(describe("p.yaml", Some(&Policy::default())), "p.yaml");
        let old = text.replace("namespace: shop", "namespace: old");
        assert_eq!(
            describe_version("r.yaml", &old, Some((text, &policy))),
            "r.yaml (HTTPRoute old/reviews)"
        );
    }
}
