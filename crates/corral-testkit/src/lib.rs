//! Multi-host test kit: network namespaces, bridges, loss and rate limits, cleanup on drop.
