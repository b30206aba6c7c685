//! The snapshot's index, kept current one watch event at a time.
//!
//! [`View`] holds the [`Index`] every snapshot clones and what deciding it takes beyond the
//! records: which pods contest an address, which endpoint addresses name a pod before its
//! status does, and which Service holds each VIP. An event touches the entries of the objects
//! it names and of the pods whose addresses it moves, never the whole cluster.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tracing::debug;

use super::Collections;
use super::objects::{PodRecord, ServiceRecord, SliceRecord};
use crate::state::{Index, Namespaces, ServicePort, Workload};

/// A namespace and a name.
pub(super) type Key = (Arc<str>, Arc<str>);

#[derive(Debug, Default)]
pub struct View {
    pub index: Index,
    /// Pods whose status also lists an address another pod holds (a stale status), by the
    /// address. Rare.
    rivals: HashMap<IpAddr, Vec<Key>>,
    /// Endpoint addresses that name a pod whose status does not list them (yet), with how
    /// many slices name it (two Services may select one pod), and the reverse. Small once the
    /// pods' statuses are in.
    adoptions: HashMap<IpAddr, (Key, u32)>,
    adopted: HashMap<Key, Vec<IpAddr>>,
    /// Each Service's EndpointSlices, by name.
    slices_of: HashMap<Key, Vec<Arc<str>>>,
    /// The VIP and ports each Service has in the index, and the Service holding each VIP.
    published: HashMap<Key, Vec<SocketAddr>>,
    /// The endpoints on this node each Service serves, with its port's entry, and the
    /// Services serving each (two may select one pod on one port: the index names one, and
    /// the other once that one goes).
    serving: HashMap<Key, Vec<(SocketAddr, Arc<ServicePort>)>>,
    served_by: HashMap<SocketAddr, Vec<Key>>,
    vips: HashMap<IpAddr, Key>,
    /// Services with a VIP left out because a pod or another Service holds it: tried again
    /// when an address is freed.
    left_out: HashSet<Key>,
    /// The enrolled and the known namespaces, until a namespace changes.
    namespaces: Option<(Namespaces, Namespaces)>,
}

/// Whether pod `a` keeps an address that `b` claims too: the newer pod does (ties by name,
/// so every order of events agrees).
fn wins(a: (&Key, &PodRecord), b: (&Key, &PodRecord)) -> bool {
    match a.1.created.cmp(&b.1.created) {
        std::cmp::Ordering::Equal => a.0 < b.0,
        newer => newer.is_gt(),
    }
}

fn key_of(workload: &Workload) -> Key {
    (workload.namespace.clone(), workload.name.clone())
}

fn pod<'c>(c: &'c Collections, key: &Key) -> Option<&'c PodRecord> {
    c.pods.get(&key.0, &key.1)
}

/// Whether `key`'s status lists `ip`.
fn claims(c: &Collections, key: &Key, ip: IpAddr) -> bool {
    pod(c, key).is_some_and(|p| p.workload.ips.contains(&ip))
}

impl View {
    /// The enrolled namespaces, and every namespace known: those with an object or a pod.
    pub fn namespaces(&mut self, c: &Collections) -> (Namespaces, Namespaces) {
        if let Some(sets) = &self.namespaces
            && c.pods.namespaces().all(|ns| sets.1.contains(ns))
        {
            return sets.clone();
        }
        let names = c.namespaces.iter();
        let enrolled = names
            .filter(|(_, _, ns)| ns.enrolled)
            .map(|(_, name, _)| name.clone());
        let known = c
            .namespaces
            .iter()
            .map(|(_, name, _)| name)
            .chain(c.pods.namespaces());
        let sets = (
            Arc::new(enrolled.collect()),
            Arc::new(known.cloned().collect()),
        );
        self.namespaces = Some(sets.clone());
        sets
    }

    /// `name` as an endpoint that names pod `namespace/name` holds it, if one does.
    pub fn adopted_name(&self, namespace: &Arc<str>, name: Arc<str>) -> Arc<str> {
        let key = (namespace.clone(), name);
        match self.adopted.get_key_value(&key) {
            Some((held, _)) => held.1.clone(),
            None => key.1,
        }
    }

    pub fn namespace_changed(&mut self) {
        self.namespaces = None;
    }

    /// Pod `key` changed (its record in `c` is the new one; `old` was the last). An address
    /// its status now lists is no longer adopted: should a later status drop it, the slice
    /// naming it adopts it again only when that slice next changes.
    pub fn pod_changed(&mut self, c: &Collections, key: Key, old: Option<&PodRecord>) {
        let new = pod(c, &key);
        let mut ips: Vec<IpAddr> = old
            .iter()
            .chain(new.iter())
            .flat_map(|p| p.workload.ips.iter().copied())
            .collect();
        ips.extend(self.adopted.get(&key).into_iter().flatten());
        // What the pod's status lists it no longer needs adopted.
        for &ip in new.iter().flat_map(|p| p.workload.ips.iter()) {
            if self
                .adoptions
                .get(&ip)
                .is_some_and(|(named, _)| *named == key)
            {
                self.adoptions.remove(&ip);
                self.forget_adopted(&key, ip);
            }
        }
        self.settle(c, ips, Some(key));
    }

    /// An EndpointSlice changed (its record in `c` is the new one; `old` was the last).
    pub fn slice_changed(&mut self, c: &Collections, key: Key, old: Option<&SliceRecord>) {
        let new = c.slices.get(&key.0, &key.1);
        let mut ips = Vec::new();
        let mut services = Vec::new();
        if let Some(old) = old {
            let service = (key.0.clone(), old.service.clone());
            if let Some(slices) = self.slices_of.get_mut(&service) {
                slices.retain(|s| *s != key.1);
                if slices.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            services.push(service);
            for e in &old.endpoints {
                if let Some(name) = &e.pod {
                    self.unadopt(e.address, &(key.0.clone(), name.clone()));
                    ips.push(e.address);
                }
            }
        }
        if let Some(new) = new {
            let service = (key.0.clone(), new.service.clone());
            self.slices_of
                .entry(service.clone())
                .or_default()
                .push(key.1.clone());
            services.push(service);
            for e in &new.endpoints {
                let Some(name) = &e.pod else { continue };
                let named = (key.0.clone(), name.clone());
                if !claims(c, &named, e.address) {
                    self.adopt(e.address, named);
                    ips.push(e.address);
                }
            }
        }
        self.settle(c, ips, None);
        services.dedup();
        for service in services {
            self.service_changed(c, &service);
        }
    }

    /// One more slice names pod `key` for `ip`. Should slices name two pods for one address
    /// (one of them stale), the first named keeps it.
    fn adopt(&mut self, ip: IpAddr, key: Key) {
        match self.adoptions.entry(ip) {
            Entry::Occupied(mut e) if e.get().0 == key => e.get_mut().1 += 1,
            Entry::Occupied(_) => {}
            Entry::Vacant(e) => {
                e.insert((key.clone(), 1));
                self.adopted.entry(key).or_default().push(ip);
            }
        }
    }

    /// One slice fewer names pod `key` for `ip`.
    fn unadopt(&mut self, ip: IpAddr, key: &Key) {
        let Entry::Occupied(mut e) = self.adoptions.entry(ip) else {
            return;
        };
        let (named, count) = e.get_mut();
        if named != key {
            return;
        }
        *count -= 1;
        if *count == 0 {
            e.remove();
            self.forget_adopted(key, ip);
        }
    }

    fn forget_adopted(&mut self, key: &Key, ip: IpAddr) {
        if let Some(ips) = self.adopted.get_mut(key) {
            ips.retain(|&a| a != ip);
            if ips.is_empty() {
                self.adopted.remove(key);
            }
        }
    }

    /// Decides again who holds each of `ips`, then rewrites the pods that gained or lost one,
    /// and `changed` (whose record changed) in any case.
    fn settle(&mut self, c: &Collections, mut ips: Vec<IpAddr>, changed: Option<Key>) {
        ips.sort_unstable();
        ips.dedup();
        let mut owners: HashMap<IpAddr, Option<Key>> = HashMap::with_capacity(ips.len());
        let mut dirty: Vec<Key> = changed.iter().cloned().collect();
        for ip in ips {
            let before = self.index.workload_by_ip(ip).map(|w| key_of(w));
            let after = self.decide(c, ip, changed.as_ref());
            if before != after {
                dirty.extend(before.iter().chain(after.iter()).cloned());
            }
            owners.insert(ip, after);
        }
        dirty.sort_unstable();
        dirty.dedup();
        let mut freed = false;
        for (&ip, owner) in &owners {
            if owner.is_none() {
                freed |= self.index.remove_ip(ip).is_some();
            }
        }
        for key in &dirty {
            self.rewrite(c, key, &owners);
        }
        // A Service VIP that a pod now holds is left out; one a pod freed may come back.
        let squatted: Vec<Key> = owners
            .iter()
            .filter(|(_, owner)| owner.is_some())
            .filter_map(|(ip, _)| self.vips.get(ip).cloned())
            .collect();
        for service in squatted {
            self.service_changed(c, &service);
        }
        if freed {
            self.retry_left_out(c);
        }
        // A list that brings slices before pods adopts every address for a moment: the
        // maps give the room back once the statuses are in.
        shrink(&mut self.adoptions);
        shrink(&mut self.adopted);
        shrink(&mut self.rivals);
    }

    /// Who holds `ip`: the winner of the pods whose status lists it, else the pod an
    /// endpoint names for it, unless that pod is gone or shares its node's network.
    fn decide(&mut self, c: &Collections, ip: IpAddr, changed: Option<&Key>) -> Option<Key> {
        let holder = self.index.workload_by_ip(ip).map(|w| key_of(w));
        let mut claimants: Vec<Key> = holder.into_iter().chain(changed.cloned()).collect();
        claimants.extend(self.rivals.remove(&ip).into_iter().flatten());
        claimants.sort_unstable();
        claimants.dedup();
        claimants.retain(|k| claims(c, k, ip));
        let winner = claimants
            .iter()
            .map(|k| (k, pod(c, k).expect("claims above")))
            .reduce(|best, next| if wins(next, best) { next } else { best })
            .map(|(k, _)| k.clone());
        if let Some(winner) = winner {
            let rivals: Vec<Key> = claimants.into_iter().filter(|k| *k != winner).collect();
            if !rivals.is_empty() {
                // Debug: it lasts as long as the stale status does.
                debug!(%ip, pod = %format!("{}/{}", winner.0, winner.1),
                    others = rivals.len(), "IP also claimed by older pods; the newest keeps it");
                self.rivals.insert(ip, rivals);
            }
            return Some(winner);
        }
        let (named, _) = self.adoptions.get(&ip)?;
        pod(c, named)
            .filter(|p| !p.host_network)
            .map(|_| named.clone())
    }

    /// Writes pod `key`'s workload as `c` and the address decisions in `owners` (then the
    /// index) make it: its own addresses it holds, then the adopted ones.
    fn rewrite(&mut self, c: &Collections, key: &Key, owners: &HashMap<IpAddr, Option<Key>>) {
        let Some(record) = pod(c, key) else {
            self.index.remove_workload(&key.0, &key.1);
            return;
        };
        let index = &self.index;
        let holds = |ip: &IpAddr| match owners.get(ip) {
            Some(owner) => owner.as_ref() == Some(key),
            None => index
                .workload_by_ip(*ip)
                .is_some_and(|w| *w.namespace == *key.0 && *w.name == *key.1),
        };
        let own = &record.workload.ips;
        let adopted = self.adopted.get(key).into_iter().flatten();
        let ips: Vec<IpAddr> = own
            .iter()
            .chain(adopted.filter(|ip| !own.contains(ip)))
            .copied()
            .filter(holds)
            .collect();
        // The record's own workload unless the addresses differ: no copy per pod.
        let workload = if ips[..] == own[..] {
            record.workload.clone()
        } else {
            Arc::new(Workload {
                ips: ips.into(),
                ..(*record.workload).clone()
            })
        };
        for &ip in &workload.ips {
            self.index.put_ip(ip, workload.clone());
        }
        self.index.put_workload(workload);
    }

    /// Service `key` or one of its slices changed: its VIP entries are written again.
    pub fn service_changed(&mut self, c: &Collections, key: &Key) {
        let freed = self.withdraw(key);
        self.publish(c, key);
        if freed {
            self.retry_left_out(c);
        }
    }

    /// Removes `key`'s VIP entries and its endpoints on this node; whether that freed a VIP.
    fn withdraw(&mut self, key: &Key) -> bool {
        self.left_out.remove(key);
        for (endpoint, _) in self.serving.remove(key).into_iter().flatten() {
            self.index.remove_endpoint(endpoint, &key.0, &key.1);
            let Entry::Occupied(mut others) = self.served_by.entry(endpoint) else {
                continue;
            };
            others.get_mut().retain(|other| other != key);
            let Some(other) = others.get().first() else {
                others.remove();
                continue;
            };
            if self.index.endpoint_service(endpoint).is_none() {
                let serving = self.serving.get(other).into_iter().flatten();
                if let Some((_, entry)) = serving.into_iter().find(|(e, _)| *e == endpoint) {
                    self.index.put_endpoint(endpoint, entry.clone());
                }
            }
        }
        let Some(addresses) = self.published.remove(key) else {
            return false;
        };
        for &address in &addresses {
            self.index.remove_service(address);
            self.vips.remove(&address.ip());
        }
        true
    }

    fn publish(&mut self, c: &Collections, key: &Key) {
        let Some(svc) = c.services.get(&key.0, &key.1) else {
            return;
        };
        let slices: Vec<&SliceRecord> = self
            .slices_of
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| c.slices.get(&key.0, name))
            .collect();
        // One entry per port, shared by the Service's VIPs and its endpoints on this node.
        let ports: Vec<(u16, Arc<ServicePort>)> = ports(svc, &slices)
            .into_iter()
            .map(|(port, endpoints, local)| {
                let entry = Arc::new(ServicePort {
                    service: key.1.clone(),
                    namespace: key.0.clone(),
                    endpoints,
                });
                for &endpoint in &local {
                    self.index.put_endpoint(endpoint, entry.clone());
                    let serving = self.serving.entry(key.clone()).or_default();
                    serving.push((endpoint, entry.clone()));
                    let by = self.served_by.entry(endpoint).or_default();
                    if !by.contains(key) {
                        by.push(key.clone());
                    }
                }
                (port, entry)
            })
            .collect();
        let mut published = Vec::new();
        for &vip in &svc.vips {
            // The apiserver's allocators keep VIPs apart from pod IPs and from each other;
            // should two objects still collide, one is left out, not the whole update.
            if self.index.workload_by_ip(vip).is_some() || self.vips.contains_key(&vip) {
                debug!(service = %format!("{}/{}", key.0, key.1), %vip,
                    "VIP also used by a pod or another Service; left out");
                self.left_out.insert(key.clone());
                continue;
            }
            self.vips.insert(vip, key.clone());
            for (port, entry) in &ports {
                let address = SocketAddr::new(vip, *port);
                self.index.put_service(address, entry.clone());
                published.push(address);
            }
        }
        if !published.is_empty() {
            self.published.insert(key.clone(), published);
        }
    }

    fn retry_left_out(&mut self, c: &Collections) {
        let waiting: Vec<Key> = self.left_out.iter().cloned().collect();
        for key in waiting {
            self.withdraw(&key);
            self.publish(c, &key);
        }
    }
}

/// Gives back a map's room once it holds under a quarter of what it has room for (amortized:
/// a shrink halves the room at least, after at least as many removals).
fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

/// A Service's ports with the ready endpoints behind each, and those of them on this node.
/// Each EndpointSlice's port of the same name gives the target port of that slice's
/// endpoints (the endpoint controller groups endpoints by the number a named port resolves
/// to); a slice without that port adds no endpoint to it, as with kube-proxy.
fn ports(
    svc: &ServiceRecord,
    slices: &[&SliceRecord],
) -> Vec<(u16, Vec<SocketAddr>, Vec<SocketAddr>)> {
    svc.ports
        .iter()
        .map(|(port_name, port)| {
            let ready: BTreeSet<(SocketAddr, bool)> = slices
                .iter()
                .filter_map(|s| {
                    let (_, target) = s.ports.iter().find(|(n, _)| n == port_name)?;
                    Some((s, *target))
                })
                .flat_map(|(s, target)| {
                    s.endpoints
                        .iter()
                        .filter(|e| e.ready)
                        .map(move |e| (SocketAddr::new(e.address, target), e.local))
                })
                .collect();
            let mut endpoints: Vec<SocketAddr> = ready.iter().map(|(e, _)| *e).collect();
            endpoints.dedup();
            let local = ready
                .iter()
                .filter(|(_, local)| *local)
                .map(|(e, _)| *e)
                .collect();
            (*port, endpoints, local)
        })
        .collect()
}
