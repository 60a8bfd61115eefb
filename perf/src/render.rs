//! Fills `{{KEY}}` placeholders of the nginx templates under `perf/nginx/`.

/// Replaces every `{{KEY}}` with its value; an unknown or unfilled placeholder is an error
/// (an nginx config with a literal `{{…}}` would fail later with a less useful message).
pub fn render(template: &str, vars: &[(&str, String)]) -> Result<String, String> {
    let mut out = template.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    if let Some(at) = out.find("{{") {
        let rest = &out[at..];
        let end = rest.find("}}").map_or(rest.len(), |e| e + 2);
        return Err(format!(
            "template placeholder {} was not filled",
            &rest[..end]
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::render;

    #[test]
    fn fills_and_refuses_leftovers() {
        let t = "listen {{A}}; pass {{B}};";
        assert_eq!(
            render(t, &[("A", "1".into()), ("B", "2".into())]).unwrap(),
            "listen 1; pass 2;"
        );
        let e = render(t, &[("A", "1".into())]).unwrap_err();
        assert!(e.contains("{{B}}"), "{e}");
    }
}
