//! Partition ownership: which member of a group pulls from which partition.
//!
//! Each member announces itself with a presence entry in the lease bucket and holds a lease entry per
//! partition it owns, both renewed every [`tick`] and gone `ttl` after the member stops renewing them. Every
//! member watches its group's entries, counts the live members and aims at a fair share of the partitions
//! (members ordered by id; the first `partitions % members` get one more). A member above its share revokes
//! the extra partitions, waits until their deliveries are settled, then deletes their leases; a member below
//! it creates leases on partitions nobody holds. The bucket's compare-and-set (create fails on a live key,
//! renewal fails on a changed one) makes sure a partition has one owner at a time.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use eventbus_core::dispatch::Dispatcher;
use eventbus_core::{Error, Result};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::consume::{self, Claim, PartitionStream};
use crate::provision::{failed, timed_out, within, Provisioner};

/// How often a member renews its entries and re-checks its share: often enough that an entry is renewed
/// several times within its lifetime.
fn tick(ttl: Duration) -> Duration {
    (ttl / 4).min(Duration::from_secs(1))
}

/// A lease this member holds.
struct Lease {
    revision: u64,
    renewed: Instant,
    claim: Arc<Claim>,
}

/// What the keeper needs to take over a partition and hand it to the fetch loop.
pub(crate) struct Target {
    pub(crate) provisioner: Arc<Provisioner>,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) ack_wait: Duration,
    pub(crate) claims: mpsc::UnboundedSender<(Arc<Claim>, PartitionStream)>,
    pub(crate) dispatcher: Dispatcher,
    /// Signalled when an owned partition's ack falls due, for the fetch loop to send it.
    pub(crate) acks_due: Arc<tokio::sync::Notify>,
}

/// Keeps one member's presence and leases; one task per subscription.
pub(crate) struct Keeper {
    leases: kv::Store,
    ttl: Duration,
    member: String,
    scope: String,
    partitions: u16,
    target: Target,
    held: BTreeMap<u16, Lease>,
    /// Revoked, still renewed until their deliveries are settled and their pull streams closed; then the
    /// lease is deleted. Handler calls are bounded by `handler_timeout` and a revoked delivery is not retried,
    /// so this ends.
    releasing: BTreeMap<u16, Lease>,
    /// Other members, by id, with when their presence was last seen.
    members: HashMap<String, Instant>,
    /// Partitions held by other members, with when their lease was last seen.
    taken: HashMap<u16, Instant>,
}

impl Keeper {
    pub(crate) fn new(leases: kv::Store, ttl: Duration, scope: String, partitions: u16, target: Target) -> Self {
        Self {
            leases,
            ttl,
            member: uuid::Uuid::now_v7().simple().to_string(),
            scope,
            partitions,
            target,
            held: BTreeMap::new(),
            releasing: BTreeMap::new(),
            members: HashMap::new(),
            taken: HashMap::new(),
        }
    }

    fn presence_key(&self) -> String {
        format!("{}.members.{}", self.scope, self.member)
    }

    fn lease_key(&self, partition: u16) -> String {
        format!("{}.partitions.{partition}", self.scope)
    }

    /// Runs until `stop`. `ready` is answered once this member holds its share (or with the error that
    /// prevents it); then the member's leases are renewed and rebalanced until `stop`, when they are given up.
    pub(crate) async fn run(mut self, ready: oneshot::Sender<Result<()>>, stop: CancellationToken) {
        let mut ready = Some(ready);
        let mut watch = match self.start().await {
            Ok(watch) => watch,
            Err(error) => {
                let _ = ready.take().map(|ready| ready.send(Err(error)));
                return;
            }
        };
        let mut ticks = tokio::time::interval(tick(self.ttl));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failure = None;
        loop {
            let renew = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = ticks.tick() => true,
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => {
                        if !self.observe(&entry) {
                            continue;
                        }
                        false
                    }
                    failed => {
                        tracing::debug!(scope = %self.scope, error = ?failed.and_then(|e| e.err()), "lease watch ended; re-opening it");
                        tokio::time::sleep(tick(self.ttl)).await;
                        match self.leases.watch_with_history(format!("{}.>", self.scope)).await {
                            Ok(reopened) => watch = reopened,
                            Err(error) => tracing::warn!(scope = %self.scope, %error, "re-opening the lease watch failed"),
                        }
                        continue;
                    }
                },
            };
            if let Err(error) = self.balance(renew).await {
                // Fatal only while `subscribe` waits for the answer; once it has gone on (it waits a bounded
                // time), the subscription lives and the next round retries.
                if ready.as_ref().is_some_and(|ready| !ready.is_closed()) {
                    failure = Some(error);
                    break;
                }
                tracing::warn!(scope = %self.scope, %error, "rebalancing partitions failed; retrying");
            }
            if self.held.len() >= self.share() {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
        }
        // A subscribe that failed is answered only once what it leased is given back.
        self.give_up().await;
        if let (Some(ready), Some(error)) = (ready, failure) {
            let _ = ready.send(Err(error));
        }
    }

    /// Announces this member and reads the group's entries up to now.
    async fn start(&mut self) -> Result<kv::Watch> {
        let timeout = self.target.provisioner.config().request_timeout;
        let what = format!("lease bucket {}", self.leases.name);
        let put = self.leases.put(self.presence_key(), Bytes::new());
        within(timeout, &what, put).await?;
        let mut watch = within(timeout, &what, self.leases.watch_with_history(format!("{}.>", self.scope))).await?;
        // The history ends with this member's own presence at the latest.
        loop {
            match tokio::time::timeout(timeout, watch.next()).await {
                Ok(Some(Ok(entry))) => {
                    self.observe(&entry);
                    if entry.delta == 0 {
                        return Ok(watch);
                    }
                }
                Ok(Some(Err(error))) => return Err(failed(&what, error)),
                Ok(None) => return Err(Error::Broker { message: format!("{what}: the watch ended"), source: None }),
                Err(_) => return Err(timed_out(&what, timeout)),
            }
        }
    }

    /// Records a change of the group's entries; true when it may change this member's share or free a
    /// partition.
    fn observe(&mut self, entry: &kv::Entry) -> bool {
        let now = Instant::now();
        let live = entry.operation == Operation::Put;
        let Some((kind, name)) =
            entry.key.strip_prefix(&self.scope).and_then(|k| k.strip_prefix('.')).and_then(|k| k.split_once('.'))
        else {
            return false;
        };
        match kind {
            "members" if name != self.member => {
                if live {
                    self.members.insert(name.to_owned(), now).is_none()
                } else {
                    self.members.remove(name).is_some()
                }
            }
            "partitions" => {
                let Ok(partition) = name.parse::<u16>() else { return false };
                if live && entry.value != self.member.as_bytes() {
                    self.taken.insert(partition, now);
                    false
                } else {
                    self.taken.remove(&partition);
                    !live
                }
            }
            _ => false,
        }
    }

    /// This member's fair share of the partitions among the members seen alive.
    fn share(&self) -> usize {
        let now = Instant::now();
        let mut members: Vec<&str> = self
            .members
            .iter()
            .filter(|(_, seen)| now.duration_since(**seen) < self.ttl)
            .map(|(id, _)| id.as_str())
            .chain(std::iter::once(self.member.as_str()))
            .collect();
        members.sort_unstable();
        let index = members.iter().position(|id| *id == self.member).unwrap_or(0);
        let (partitions, count) = (usize::from(self.partitions), members.len());
        partitions / count + usize::from(index < partitions % count)
    }

    /// One round: renew (on ticks), revoke what exceeds the share, delete the leases of revoked partitions
    /// once settled, and lease free partitions up to the share.
    async fn balance(&mut self, renew: bool) -> Result<()> {
        let timeout = self.target.provisioner.config().request_timeout;
        if renew {
            let put = self.leases.put(self.presence_key(), Bytes::new());
            if let Err(error) = within(timeout, "presence", put).await {
                tracing::debug!(scope = %self.scope, %error, "renewing presence failed");
            }
            self.renew(timeout).await;
        }
        self.resume_stalled().await;
        let share = self.share();
        while self.held.len() > share {
            let Some((partition, lease)) = self.held.pop_last() else { break };
            tracing::debug!(scope = %self.scope, partition, share, "handing a partition over");
            lease.claim.revoked.cancel();
            self.releasing.insert(partition, lease);
        }
        self.release_settled().await;
        if self.held.len() < share {
            self.acquire(share, timeout).await?;
        }
        Ok(())
    }

    /// Takes over again, from its first unacknowledged message, each held partition whose pull stream saw a
    /// delivery lost in transit or whose consumer no longer applies this member's acks (checked here when acked
    /// messages came back), once its claim is idle.
    async fn resume_stalled(&mut self) {
        let timeout = self.target.provisioner.config().request_timeout;
        for lease in self.held.values() {
            lease.claim.check_acks_applied(timeout).await;
            if lease.claim.revoked.is_cancelled() {
                lease.claim.send_due_ack().await;
            }
        }
        let stalled: Vec<u16> = self
            .held
            .iter()
            .filter(|(_, lease)| lease.claim.revoked.is_cancelled() && lease.claim.idle())
            .map(|(&partition, _)| partition)
            .collect();
        for partition in stalled {
            match self.take_over(partition).await {
                Ok(claim) => {
                    if let Some(lease) = self.held.get_mut(&partition) {
                        lease.claim = claim;
                    }
                }
                Err(error) => {
                    tracing::warn!(scope = %self.scope, partition, %error, "re-reading a partition failed; retrying")
                }
            }
        }
    }

    /// Renews every lease this member holds, all at once. A renewal refused because the key changed is checked:
    /// a renewal that timed out may have landed, leaving the key this member's at a newer revision.
    async fn renew(&mut self, timeout: Duration) {
        let sent = Instant::now();
        let value = Bytes::from(self.member.clone());
        let (leases, member) = (&self.leases, self.member.as_bytes());
        let renewals = self.held.iter().chain(self.releasing.iter()).map(|(&partition, lease)| {
            let (key, value, revision) = (self.lease_key(partition), value.clone(), lease.revision);
            async move {
                let renewed = match tokio::time::timeout(timeout, leases.update(&key, value, revision)).await {
                    Ok(Ok(revision)) => Some(Ok(revision)),
                    Ok(Err(error)) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                        match tokio::time::timeout(timeout, leases.entry(&key)).await {
                            Ok(Ok(Some(entry))) if entry.operation == Operation::Put && entry.value == member => {
                                Some(Ok(entry.revision))
                            }
                            _ => Some(Err(())),
                        }
                    }
                    // Unsure whether the server has it.
                    _ => None,
                };
                (partition, renewed)
            }
        });
        let outcomes = futures_util::future::join_all(renewals).await;
        let now = Instant::now();
        for (partition, renewed) in outcomes {
            let lease = match self.held.get_mut(&partition) {
                Some(lease) => lease,
                None => self.releasing.get_mut(&partition).expect("a releasing lease"),
            };
            match renewed {
                Some(Ok(revision)) => {
                    lease.revision = revision;
                    lease.renewed = sent;
                    continue;
                }
                // An unconfirmed lease is kept until shortly before it would expire on the server.
                None if now.duration_since(lease.renewed) < self.ttl * 3 / 4 => continue,
                _ => {}
            }
            tracing::warn!(scope = %self.scope, partition, "lost the lease of a partition; another member may own it now");
            lease.claim.lost();
            self.held.remove(&partition);
            self.releasing.remove(&partition);
        }
    }

    /// Deletes the leases of revoked partitions that are idle: no delivery left unsettled or unacknowledged (the
    /// fetch loop no longer sends a revoked partition's acks: they go from here), no pull stream open.
    async fn release_settled(&mut self) {
        for lease in self.releasing.values() {
            lease.claim.send_due_ack().await;
        }
        let idle: Vec<u16> = self.releasing.iter().filter(|(_, lease)| lease.claim.idle()).map(|(&p, _)| p).collect();
        for partition in idle {
            let lease = self.releasing.remove(&partition).expect("a releasing lease");
            self.delete(partition, lease.revision).await;
        }
    }

    async fn delete(&self, partition: u16, revision: u64) {
        let timeout = self.target.provisioner.config().request_timeout;
        let delete = self.leases.delete_expect_revision(self.lease_key(partition), Some(revision));
        if let Err(error) = within(timeout, "lease", delete).await {
            tracing::debug!(scope = %self.scope, partition, %error, "deleting a lease failed; it expires on its own");
        }
    }

    /// Leases free partitions until this member holds `share`, starting at a place of its own so members
    /// joining together rarely race for the same partition.
    async fn acquire(&mut self, share: usize, timeout: Duration) -> Result<()> {
        let now = Instant::now();
        let count = u32::from(self.partitions);
        let first = self.member.bytes().fold(0u32, |sum, b| sum.wrapping_add(u32::from(b))) % count;
        for offset in 0..count {
            if self.held.len() >= share {
                break;
            }
            let partition = u16::try_from((first + offset) % count).unwrap_or(0);
            let taken = self.taken.get(&partition).is_some_and(|seen| now.duration_since(*seen) < self.ttl);
            if taken || self.held.contains_key(&partition) || self.releasing.contains_key(&partition) {
                continue;
            }
            let create = self.leases.create(self.lease_key(partition), Bytes::from(self.member.clone()));
            let revision = match tokio::time::timeout(timeout, create).await {
                Ok(Ok(revision)) => revision,
                Ok(Err(error)) if error.kind() == CreateErrorKind::AlreadyExists => {
                    self.taken.insert(partition, now);
                    continue;
                }
                Ok(Err(error)) => return Err(failed("lease", error)),
                Err(_) => return Err(timed_out("lease", timeout)),
            };
            match self.take_over(partition).await {
                Ok(claim) => {
                    tracing::debug!(scope = %self.scope, partition, "took over a partition");
                    self.held.insert(partition, Lease { revision, renewed: now, claim });
                }
                Err(error) => {
                    self.delete(partition, revision).await;
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    async fn take_over(&self, partition: u16) -> Result<Arc<Claim>> {
        let Target { provisioner, topic, group, ack_wait, claims, acks_due, .. } = &self.target;
        let taken = provisioner.take_over(topic, group, partition, *ack_wait).await?;
        let claim = Claim::owned(partition, taken, acks_due.clone());
        let stream = consume::open(claim.clone()).await?;
        // The fetch loop is gone only when the subscription stops; the claim is then given up with the rest.
        let _ = claims.send((claim.clone(), stream));
        Ok(claim)
    }

    /// At close: revokes every partition, waits for the running handlers to settle their deliveries (queued
    /// ones are dropped for the next owner) and for the pull streams to close, renewing the leases meanwhile,
    /// then deletes the leases and the presence, so the other members take over at once instead of after
    /// `ttl`. Bounded by the subscription's close deadline, after which the task is aborted and the entries
    /// expire on their own.
    async fn give_up(mut self) {
        for (partition, lease) in std::mem::take(&mut self.held) {
            lease.claim.revoked.cancel();
            self.releasing.insert(partition, lease);
        }
        let timeout = self.target.provisioner.config().request_timeout;
        let mut renewed = Instant::now();
        loop {
            drop(self.target.dispatcher.take_queued());
            self.release_settled().await;
            if self.releasing.is_empty() {
                break;
            }
            if renewed.elapsed() >= tick(self.ttl) {
                self.renew(timeout).await;
                renewed = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Err(error) = within(timeout, "presence", self.leases.delete(self.presence_key())).await {
            tracing::debug!(scope = %self.scope, %error, "deleting the presence failed; it expires on its own");
        }
    }
}
