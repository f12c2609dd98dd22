//! Which store paths share a layer: the popularity contest of nixpkgs' `buildLayeredImage`
//! and nix2container. A path's popularity is how many paths of the closure refer to it,
//! directly or not (itself included); the most popular paths (glibc and the like, which many
//! images share) get a layer each, bottom first, and the rest share the last store layer, so
//! a changed configuration changes few layers and registries keep the shared ones.
//!
//! The toplevel is not placed here: it is unique to each configuration, so a layer of its
//! own would be shared by nothing and change with every change. It goes into the machine
//! layer, which changes with it anyway, so a change of the toplevel alone is one new layer.

use std::collections::{BTreeMap, BTreeSet};

/// The store layers of `closure` (path → references): at most `store_layers` groups, each
/// sorted, most popular first. Ties go by path, so the grouping is the same everywhere.
/// Paths in `elsewhere` (the toplevel, laid into the machine layer) count for popularity
/// but are in no group.
pub fn group(closure: &BTreeMap<String, Vec<String>>, store_layers: usize, elsewhere: &[&str]) -> Vec<Vec<String>> {
    let mut popularity: BTreeMap<&str, usize> = closure.keys().map(|p| (p.as_str(), 0)).collect();
    for root in closure.keys() {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut todo = vec![root.as_str()];
        while let Some(p) = todo.pop() {
            if !seen.insert(p) {
                continue;
            }
            if let Some(n) = popularity.get_mut(p) {
                *n += 1;
            }
            if let Some(refs) = closure.get(p) {
                todo.extend(refs.iter().map(String::as_str).filter(|r| !seen.contains(r)));
            }
        }
    }
    let mut ranked: Vec<(&str, usize)> = popularity.into_iter().filter(|(p, _)| !elsewhere.contains(p)).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let store_layers = store_layers.max(1);
    if ranked.is_empty() {
        return Vec::new();
    }
    if ranked.len() <= store_layers {
        return ranked.into_iter().map(|(p, _)| vec![p.to_owned()]).collect();
    }
    let mut groups: Vec<Vec<String>> = ranked[..store_layers - 1].iter().map(|(p, _)| vec![(*p).to_owned()]).collect();
    let mut rest: Vec<String> = ranked[store_layers - 1..].iter().map(|(p, _)| (*p).to_owned()).collect();
    rest.sort();
    groups.push(rest);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closure(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges.iter().map(|(p, r)| ((*p).to_owned(), r.iter().map(|s| (*s).to_owned()).collect())).collect()
    }

    #[test]
    fn most_referenced_first_and_the_rest_merged() {
        // top -> app -> lib -> libc; top -> libc; tool -> libc
        let c = closure(&[("top", &["app", "libc", "tool"]), ("app", &["lib"]), ("lib", &["libc"]), ("libc", &[]), ("tool", &["libc"])]);
        assert_eq!(group(&c, 10, &[]), vec![vec!["libc"], vec!["lib"], vec!["app"], vec!["tool"], vec!["top"]]);
        assert_eq!(group(&c, 3, &[]), vec![vec!["libc".to_owned()], vec!["lib".to_owned()], vec!["app".to_owned(), "tool".to_owned(), "top".to_owned()]]);
        assert_eq!(group(&c, 1, &[]), vec![vec!["app", "lib", "libc", "tool", "top"]]);
    }

    #[test]
    fn the_toplevel_is_in_no_store_layer_and_the_others_keep_their_places() {
        let c = closure(&[("top", &["app", "libc", "tool"]), ("app", &["lib"]), ("lib", &["libc"]), ("libc", &[]), ("tool", &["libc"])]);
        assert_eq!(group(&c, 10, &["top"]), vec![vec!["libc"], vec!["lib"], vec!["app"], vec!["tool"]]);
        assert_eq!(group(&c, 3, &["top"]), vec![vec!["libc".to_owned()], vec!["lib".to_owned()], vec!["app".to_owned(), "tool".to_owned()]]);
        assert!(group(&closure(&[("top", &[])]), 5, &["top"]).is_empty());
    }
}
