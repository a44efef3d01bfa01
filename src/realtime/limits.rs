//! How many sockets one account and one client address may hold on this replica.
//!
//! An upgrade takes a [`SocketSlot`] before the socket is accepted; the slot is given back
//! when the socket's connection actor is dropped, whichever way the socket ended. Beyond a
//! cap the upgrade is refused (429 `too_many_sockets`). The caps are per replica: a client
//! spread over N replicas may hold up to N times as many.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use crate::domain::UserId;

/// Which cap an upgrade ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CapReached {
    #[error("this account already has {0} sockets open here")]
    Account(usize),
    #[error("this address already has {0} sockets open here")]
    Address(usize),
}

/// Live socket counts by account and by client address.
pub struct SocketCounts {
    per_user: usize,
    per_address: usize,
    // std Mutexes: held for one map operation, never across an await.
    users: Mutex<HashMap<UserId, usize>>,
    addresses: Mutex<HashMap<IpAddr, usize>>,
}

/// One socket's place in the counts; dropping it gives the place back.
pub struct SocketSlot {
    counts: Arc<SocketCounts>,
    user: UserId,
    address: Option<IpAddr>,
}

/// Adds one to `key`'s count unless it is at `cap`.
fn take<K: Hash + Eq>(map: &Mutex<HashMap<K, usize>>, key: K, cap: usize) -> bool {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    let count = map.entry(key).or_default();
    if *count >= cap {
        return false;
    }
    *count += 1;
    true
}

/// Takes one off `key`'s count, forgetting keys that reach zero.
fn give_back<K: Hash + Eq>(map: &Mutex<HashMap<K, usize>>, key: K) {
    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(count) = map.get_mut(&key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(&key);
        }
    }
}

impl SocketCounts {
    pub fn new(per_user: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            per_user,
            per_address,
            users: Mutex::default(),
            addresses: Mutex::default(),
        })
    }

    /// A place for one more socket of `user` from `address` (unknown addresses are not
    /// counted), or the cap it would pass.
    pub fn reserve(
        self: &Arc<Self>,
        user: UserId,
        address: Option<IpAddr>,
    ) -> Result<SocketSlot, CapReached> {
        if let Some(address) = address
            && !take(&self.addresses, address, self.per_address)
        {
            return Err(CapReached::Address(self.per_address));
        }
        if !take(&self.users, user, self.per_user) {
            if let Some(address) = address {
                give_back(&self.addresses, address);
            }
            return Err(CapReached::Account(self.per_user));
        }
        Ok(SocketSlot {
            counts: self.clone(),
            user,
            address,
        })
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        give_back(&self.counts.users, self.user);
        if let Some(address) = self.address {
            give_back(&self.counts.addresses, address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const CAFE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    #[test]
    fn an_account_gets_no_more_sockets_than_its_cap_until_one_closes() {
        let counts = SocketCounts::new(2, 100);
        let first = counts.reserve(UserId(1), HOME).expect("first");
        let _second = counts.reserve(UserId(1), CAFE).expect("second");
        assert_eq!(
            counts.reserve(UserId(1), HOME).err(),
            Some(CapReached::Account(2))
        );
        // Another account is not affected.
        assert!(counts.reserve(UserId(2), HOME).is_ok());
        drop(first);
        assert!(counts.reserve(UserId(1), HOME).is_ok());
    }

    #[test]
    fn an_address_gets_no_more_sockets_than_its_cap_and_a_refusal_takes_nothing() {
        let counts = SocketCounts::new(1, 2);
        let _a = counts.reserve(UserId(1), HOME).expect("a");
        // Refused by the account cap: the address's count is given back.
        assert_eq!(
            counts.reserve(UserId(1), HOME).err(),
            Some(CapReached::Account(1))
        );
        let _b = counts.reserve(UserId(2), HOME).expect("b");
        assert_eq!(
            counts.reserve(UserId(3), HOME).err(),
            Some(CapReached::Address(2))
        );
        assert!(counts.reserve(UserId(3), CAFE).is_ok());
    }

    #[test]
    fn counts_are_forgotten_when_they_reach_zero() {
        let counts = SocketCounts::new(5, 5);
        drop(counts.reserve(UserId(1), HOME));
        assert!(counts.users.lock().unwrap().is_empty());
        assert!(counts.addresses.lock().unwrap().is_empty());
    }
}
