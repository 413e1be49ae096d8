//! The tokio driver for corral-cast-proto: sockets, files, block devices, progress.
