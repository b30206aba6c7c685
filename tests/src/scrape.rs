//! Reading a Prometheus text scrape, as the metrics tests assert on it.

/// The samples of `metric` whose labels include every one of `labels` (`key="value"` pairs),
/// as `(label set, value)`; a sample without labels has an empty set.
pub fn samples<'a>(scrape: &'a str, metric: &str, labels: &[&str]) -> Vec<(&'a str, f64)> {
    scrape
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (set, value) = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((set, value.parse().ok()?))
        })
        .filter(|(set, _)| labels.iter().all(|l| set.split(',').any(|p| p == *l)))
        .collect()
}

/// The value of the one sample of `metric` with `labels`; panics, showing the scrape, unless
/// exactly one matches.
pub fn sample(scrape: &str, metric: &str, labels: &[&str]) -> f64 {
    let found = samples(scrape, metric, labels);
    assert_eq!(found.len(), 1, "{metric} {labels:?} in:\n{scrape}");
    found[0].1
}
