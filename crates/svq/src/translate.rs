//! Translation of guest buffer addresses into the addresses the device uses.
//!
//! vhost-user devices map guest memory themselves and take guest-physical addresses in
//! descriptors ([`IdentityTranslation`]). A vhost-vdpa device sees I/O virtual addresses
//! ([`IovaTranslation`], backed by an [`IovaTree`] that maps GPA ranges to IOVA ranges).

use crate::error::QueueError;
use crate::iova::IovaTree;
use std::sync::{Arc, RwLock};

/// Maps a guest buffer to the address the device must see in a shadow descriptor.
pub trait Translate: Send + Sync {
    /// Device address of the `len` bytes at guest-physical `gpa`. The whole buffer must map to one
    /// contiguous device range, else [`QueueError::Untranslatable`].
    fn to_device(&self, gpa: u64, len: u32) -> Result<u64, QueueError>;
}

/// vhost-user: descriptors carry guest-physical addresses unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityTranslation;

impl Translate for IdentityTranslation {
    #[inline(always)]
    fn to_device(&self, gpa: u64, _len: u32) -> Result<u64, QueueError> {
        Ok(gpa)
    }
}

/// vhost-vdpa: guest-physical ranges were mapped to IOVAs (taddr = GPA in the tree). The tree is
/// shared with the transport, which updates it when the memory table changes.
#[derive(Debug, Clone)]
pub struct IovaTranslation {
    tree: Arc<RwLock<IovaTree>>,
}

impl IovaTranslation {
    /// Translate through `tree` (taddr = guest-physical address).
    pub fn new(tree: Arc<RwLock<IovaTree>>) -> Self {
        IovaTranslation { tree }
    }

    /// The shared tree.
    pub fn tree(&self) -> &Arc<RwLock<IovaTree>> {
        &self.tree
    }
}

impl Translate for IovaTranslation {
    fn to_device(&self, gpa: u64, len: u32) -> Result<u64, QueueError> {
        let tree = self.tree.read().unwrap_or_else(|p| p.into_inner());
        tree.translate_taddr(gpa, u64::from(len))
            .ok_or(QueueError::Untranslatable {
                addr: gpa,
                len: u64::from(len),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_identity() {
        assert_eq!(IdentityTranslation.to_device(0x1234, 5), Ok(0x1234));
    }

    #[test]
    fn iova_translation_covers_whole_buffer_or_fails() {
        let mut t = IovaTree::new(0x1_0000, 0xffff_ffff).unwrap();
        let iova = t.alloc(0x10_0000, 0x1000, 0).unwrap(); // GPA 0..1 MiB
        let x = IovaTranslation::new(Arc::new(RwLock::new(t)));
        assert_eq!(x.to_device(0x2000, 0x100), Ok(iova + 0x2000));
        assert_eq!(
            x.to_device(0xf_ff00, 0x200),
            Err(QueueError::Untranslatable {
                addr: 0xf_ff00,
                len: 0x200
            })
        );
        assert!(x.to_device(0x20_0000, 1).is_err());
    }
}
