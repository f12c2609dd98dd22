//! OCI images: what a push reads an image from, and the registry it pushes to.
//!
//! An image to push is a [`PushSource`]: a manifest and the blobs it names (config and
//! layers), each written on demand into a stream, so a layer goes from where it is (the
//! store, a layout on disk) to the registry without a staged copy.

pub mod auth;
pub mod registry;

/// A blob as a manifest names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// Its media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
}

/// An image that can be pushed: its manifest and the blobs the manifest names.
pub trait PushSource {
    /// The manifest's bytes and media type.
    fn manifest(&self) -> (&[u8], &str);
    /// The config and the layers.
    fn blobs(&self) -> Vec<Descriptor>;
    /// Writes blob `d`'s bytes to `out`.
    fn write_blob(&self, d: &Descriptor, out: &mut dyn std::io::Write) -> std::io::Result<()>;
}
