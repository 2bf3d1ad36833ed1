//! Where a repository's replicas go: the storages a new repository is assigned to, the
//! storages around one that already holds it, and how many make a majority.

use rand::seq::SliceRandom as _;

use super::nodes::{Nodes, VirtualStorage};
use crate::model::StorageName;

/// How many of `assigned` replicas make a majority.
pub fn majority(assigned: usize) -> usize {
    assigned / 2 + 1
}

/// The storages a new repository is assigned to, and those of them reachable now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPlacement {
    /// `replication_factor` storages: healthy ones first, each group in random order, so that
    /// repositories spread over the storages.
    pub assigned: Vec<StorageName>,
    /// The assigned storages whose nodes answer, in the same order.
    pub reachable: Vec<StorageName>,
}

impl NewPlacement {
    /// Whether enough assigned storages are reachable to create the repository.
    pub fn has_majority(&self) -> bool {
        self.reachable.len() >= majority(self.assigned.len())
    }
}

impl VirtualStorage {
    /// Places a new repository, preferring the storages `is_healthy` says answer.
    pub fn place_new(&self, is_healthy: impl Fn(&StorageName) -> bool) -> NewPlacement {
        let (mut healthy, mut unhealthy): (Vec<StorageName>, Vec<StorageName>) =
            self.storages.iter().cloned().partition(&is_healthy);
        healthy.shuffle(&mut rand::rng());
        unhealthy.shuffle(&mut rand::rng());
        let assigned: Vec<StorageName> = healthy
            .iter()
            .chain(&unhealthy)
            .take(self.replication_factor)
            .cloned()
            .collect();
        let reachable = assigned
            .iter()
            .filter(|storage| healthy.contains(storage))
            .cloned()
            .collect();
        NewPlacement {
            assigned,
            reachable,
        }
    }

    /// Places a repository that `holder` already holds: `holder` first, then the others in
    /// configured order, up to the replication factor.
    pub fn place_around(&self, holder: &StorageName) -> Vec<StorageName> {
        let mut assigned = vec![holder.clone()];
        assigned.extend(
            self.storages
                .iter()
                .filter(|storage| *storage != holder)
                .take(self.replication_factor.saturating_sub(1))
                .cloned(),
        );
        assigned
    }
}

impl Nodes {
    /// Where each virtual storage places its repositories, as the reconciler needs it.
    pub fn placements(&self) -> Vec<crate::store::Placement> {
        self.virtual_storages()
            .map(|vs| crate::store::Placement {
                virtual_storage: vs.name.clone(),
                storages: vs.storages.clone(),
                replication_factor: vs.replication_factor,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(names: &[&str]) -> Vec<StorageName> {
        names
            .iter()
            .map(|n| StorageName::parse(n).unwrap())
            .collect()
    }

    fn virtual_storage(factor: usize) -> VirtualStorage {
        VirtualStorage {
            name: StorageName::parse("default").unwrap(),
            replication_factor: factor,
            push_to_create: false,
            storages: names(&["a", "b", "c", "d"]),
        }
    }

    #[test]
    fn a_majority_is_more_than_half() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(2), 2);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(5), 3);
    }

    #[test]
    fn a_new_repository_goes_to_healthy_storages_first() {
        let down = names(&["a", "c"]);
        for _ in 0..20 {
            let placement = virtual_storage(3).place_new(|s| !down.contains(s));
            assert_eq!(placement.assigned.len(), 3);
            let mut first_two = placement.assigned[..2].to_vec();
            first_two.sort();
            assert_eq!(first_two, names(&["b", "d"]));
            assert_eq!(placement.reachable, placement.assigned[..2].to_vec());
            assert!(placement.has_majority());
        }
        let placement = virtual_storage(3).place_new(|s| s.as_str() == "a");
        assert_eq!(placement.reachable, names(&["a"]));
        assert!(!placement.has_majority());
    }

    #[test]
    fn a_held_repository_is_placed_around_its_holder() {
        assert_eq!(
            virtual_storage(3).place_around(&StorageName::parse("c").unwrap()),
            names(&["c", "a", "b"])
        );
        assert_eq!(
            virtual_storage(1).place_around(&StorageName::parse("d").unwrap()),
            names(&["d"])
        );
    }
}
