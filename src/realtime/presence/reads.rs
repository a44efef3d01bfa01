//! Reading the views of watched users from the registry: the first read once this replica
//! hears the user's channel (in batches), and reads again when entries reach their expiry,
//! when a read failed, and after the bus was lost. Events heard while a read is under way
//! win over what it returns. Also reading from the store whether each lets followers see
//! them (`share_listening`): with the first read, and again when their preferences change.

use std::collections::HashSet;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::Presence;
use super::views::{Consent, Watched, apply};
use crate::domain::UserId;
use crate::presence::view::View;
use crate::presence::{Registry, RegistryError, Snapshot, now_ms};
use crate::realtime::hub::Watch;
use crate::store::{Store, StoreError, preferences};

/// Most users read from the registry in one round trip when they start being shown.
const MAX_LOAD_BATCH: usize = 1_000;

/// How often views are checked for entries past their expiry (at most).
pub(super) const VIEW_SWEEP_MAX: Duration = Duration::from_secs(1);

/// How long after a failed read of users' consent it is tried again.
const CONSENT_RETRY: Duration = Duration::from_secs(1);

impl Presence {
    /// Starts showing `users` (those not shown yet are read from the registry once this
    /// replica hears their channels).
    pub(super) fn watch(
        &mut self,
        users: impl IntoIterator<Item = UserId>,
        ctx: &mut Context<Self>,
    ) {
        let mut new = Vec::new();
        let mut heard = Vec::new();
        for user in users {
            if self.views.contains_key(&user) {
                continue;
            }
            self.generations += 1;
            let generation = self.generations;
            self.views.insert(
                user,
                Watched {
                    generation,
                    ..Watched::default()
                },
            );
            let (done, signal) = oneshot::channel();
            self.hub.do_send(Watch { user, heard: done });
            new.push((user, generation));
            heard.push(signal);
        }
        self.to_load.extend(
            new.into_iter()
                .zip(heard)
                .map(|((user, generation), signal)| (user, generation, signal)),
        );
        self.load_next(ctx);
    }

    /// Reads the next batch of newly watched users from the registry, one batch at a time (a
    /// burst of joins, say after a restart, becomes a few large reads, not thousands).
    fn load_next(&mut self, ctx: &mut Context<Self>) {
        if self.loading || self.to_load.is_empty() {
            return;
        }
        self.loading = true;
        let batch: Vec<_> = self
            .to_load
            .drain(..self.to_load.len().min(MAX_LOAD_BATCH))
            .collect();
        let mut users = Vec::with_capacity(batch.len());
        let mut heard = Vec::with_capacity(batch.len());
        for (user, generation, signal) in batch {
            users.push((user, generation));
            heard.push(signal);
        }
        let asked: Vec<UserId> = users.iter().map(|(user, _)| *user).collect();
        let consent_read = self.start_consent_read(&asked);
        let (registry, store) = (self.registry.clone(), self.store.clone());
        ctx.spawn(
            async move {
                for signal in heard {
                    let _ = signal.await;
                }
                // Both once the channel is heard, so a change published after either read
                // reaches this replica.
                let snapshots = registry.snapshots(asked.clone()).await;
                let consent = not_sharing(&store, &asked).await;
                (snapshots, asked, consent)
            }
            .into_actor(self)
            .map(move |(snapshots, asked, consent), this, ctx| {
                this.loaded(users, snapshots);
                this.consent_answered(asked, consent_read, consent, ctx);
                this.loading = false;
                this.load_next(ctx);
            }),
        );
    }

    /// Takes a number for a read of `users`' consent: only the latest read's answer counts.
    pub(super) fn start_consent_read(&mut self, users: &[UserId]) -> u64 {
        self.consent_reads += 1;
        for user in users {
            if let Some(watched) = self.views.get_mut(user) {
                watched.consent_read = self.consent_reads;
            }
        }
        self.consent_reads
    }

    /// Reads again whether `users` (watched here) let followers see them.
    pub(super) fn read_consent(&mut self, users: Vec<UserId>, ctx: &mut Context<Self>) {
        let read = self.start_consent_read(&users);
        let store = self.store.clone();
        ctx.spawn(
            async move {
                let consent = not_sharing(&store, &users).await;
                (users, consent)
            }
            .into_actor(self)
            .map(move |(users, consent), this, ctx| {
                this.consent_answered(users, read, consent, ctx)
            }),
        );
    }

    /// Those of `users` still watched whose latest consent read is `read`.
    fn still_read_by(&self, users: Vec<UserId>, read: u64) -> Vec<UserId> {
        users
            .into_iter()
            .filter(|user| self.views.get(user).is_some_and(|w| w.consent_read == read))
            .collect()
    }

    /// A read of `users`' consent is back; a failed one is tried again a second later
    /// (meanwhile they are hidden from followers).
    fn consent_answered(
        &mut self,
        users: Vec<UserId>,
        read: u64,
        answer: Result<HashSet<UserId>, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        let users = self.still_read_by(users, read);
        let hidden = match answer {
            Ok(hidden) => hidden,
            Err(error) => {
                tracing::warn!(%error, "could not read who shares their listening; retrying");
                for user in &users {
                    self.set_consent(*user, Consent::Hidden);
                }
                ctx.run_later(CONSENT_RETRY, move |this, ctx| {
                    let users = this.still_read_by(users, read);
                    if !users.is_empty() {
                        this.read_consent(users, ctx);
                    }
                });
                return;
            }
        };
        for user in users {
            let consent = if hidden.contains(&user) {
                Consent::Hidden
            } else {
                Consent::Shared
            };
            self.set_consent(user, consent);
        }
    }

    /// The first read of `users` is back: their views start, and their viewers get state.
    fn loaded(&mut self, users: Vec<(UserId, u64)>, result: Result<Vec<Snapshot>, RegistryError>) {
        let failed = result.is_err();
        if let Err(error) = &result {
            tracing::warn!(%error, "presence read failed; retrying");
        }
        let mut snapshots = result.unwrap_or_default().into_iter();
        for (user, generation) in users {
            let snapshot = snapshots.next().unwrap_or_default();
            let Some(watched) = self.views.get_mut(&user) else {
                continue;
            };
            // Read for an earlier watch of this user (released and watched again since).
            if watched.generation != generation || watched.view.is_some() {
                continue;
            }
            let mut view = View::from_snapshot(snapshot, &mut self.refs);
            for event in watched.buffered.drain(..) {
                apply(&mut view, event, &mut self.refs);
            }
            watched.view = Some(view);
            watched.stale = failed || std::mem::take(&mut watched.reread);
            self.view_ready(user);
        }
    }

    /// Reads again the views whose entries reached their expiry (or whose last read failed).
    pub(super) fn sweep_views(&mut self, ctx: &mut Context<Self>) {
        let now = now_ms();
        let due: Vec<UserId> = self
            .views
            .iter_mut()
            .filter(|(_, w)| {
                !w.reloading
                    && w.view.as_ref().is_some_and(|v| {
                        w.stale || v.next_expiry().is_some_and(|expiry| expiry <= now)
                    })
            })
            .map(|(user, w)| {
                w.reloading = true;
                *user
            })
            .collect();
        if due.is_empty() {
            return;
        }
        self.reload(due, ctx);
    }

    /// Reads `users` (whose views are marked `reloading`) again from the registry.
    fn reload(&mut self, users: Vec<UserId>, ctx: &mut Context<Self>) {
        let registry = self.registry.clone();
        let generations: Vec<u64> = users
            .iter()
            .map(|user| self.views.get(user).map_or(0, |w| w.generation))
            .collect();
        let asked = users.clone();
        ctx.spawn(
            async move { registry.snapshots(asked).await }
                .into_actor(self)
                .map(move |result, this, _| {
                    let failed = result.is_err();
                    let mut snapshots = result.unwrap_or_default().into_iter();
                    for (user, generation) in users.into_iter().zip(generations) {
                        let snapshot = snapshots.next();
                        let Some(watched) = this.views.get_mut(&user) else {
                            continue;
                        };
                        if watched.generation != generation {
                            continue;
                        }
                        watched.reloading = false;
                        watched.stale = failed || std::mem::take(&mut watched.reread);
                        let heard = std::mem::take(&mut watched.heard);
                        let output_heard = std::mem::take(&mut watched.output_heard);
                        let Some(view) = watched.view.as_mut() else {
                            continue;
                        };
                        let change = match snapshot {
                            Some(snapshot) => {
                                view.replace_except(snapshot, &heard, output_heard, &mut this.refs)
                            }
                            // The registry is away: entries past their expiry go anyway, as
                            // nobody can have refreshed them.
                            None => view.expire(now_ms()),
                        };
                        this.broadcast(user, &change);
                    }
                }),
        );
    }

    /// Reads every view again (the bus is back after a loss); a view whose read is under way
    /// is read again once it is back, as it may have been answered while the bus was away.
    /// Every watched user's consent is read again too: a change of it may have gone unheard.
    pub(super) fn reread_views(&mut self, ctx: &mut Context<Self>) {
        let watched: Vec<UserId> = self.views.keys().copied().collect();
        if !watched.is_empty() {
            self.read_consent(watched, ctx);
        }
        let mut users = Vec::new();
        for (user, watched) in &mut self.views {
            if watched.view.is_some() && !watched.reloading {
                watched.reloading = true;
                users.push(*user);
            } else {
                watched.reread = true;
            }
        }
        if !users.is_empty() {
            // After the rewrites of this replica's own entries are queued, so they are back.
            ctx.run_later(Duration::from_millis(200), move |this, ctx| {
                this.reload(users, ctx)
            });
        }
    }
}

/// Those of `users` who do not let followers see them.
async fn not_sharing(store: &Store, users: &[UserId]) -> Result<HashSet<UserId>, StoreError> {
    let mut pooled = store.conn().await?;
    preferences::not_sharing(&mut pooled.conn(), users).await
}
