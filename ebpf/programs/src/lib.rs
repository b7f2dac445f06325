//! Host-side stub of `ferrox-ebpf`: `ebpf/datapath` build-depends on this crate so that cargo
//! rebuilds the datapath when the kernel programs change; the programs themselves are the
//! `ferrox-ebpf` binary, built for `bpfel-unknown-none` by aya-build.
#![no_std]
