//! Sans-IO multicast imaging protocol: packets, signed manifest, parity repair, sender and receiver state machines.
