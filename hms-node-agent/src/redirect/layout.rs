//! The layout version of this build's kernel programs: the name of the pin set they live in.
//!
//! Derived, never hand-bumped: a SHA-256 over what a pinned map's or program's reuse depends
//! on, read from the very object the agent embeds: every pinned map's name, type, key size,
//! value size, max entries and flags, and every program's name, section (its attach type) and
//! instructions. A change to any of them (a record grew a field, a map was added, a hook was
//! added or its code changed) gives a new version, so the new build attaches a set of its own
//! beside the old one instead of adopting maps whose records it would misread, or keeping
//! old programs running.
//!
//! Owns only the computation. Never reads the pin dir: which sets exist is `generation`'s.
//!
//! Not covered: two fields of one record swapping places at the same size. The `const _`
//! size asserts in `hms-ebpf` are the guard there; a reordering also changes the programs'
//! instructions (offsets), which are hashed.

use std::sync::OnceLock;

use anyhow::Context as _;
use aya_obj::{Object, maps::PinningType};

/// The hex digits of the version used in a pin set's directory name: 64 bits of the digest
/// are plenty to tell a handful of builds apart.
const VERSION_HEX_DIGITS: usize = 16;

/// This build's layout version (hex), computed once from the embedded object.
pub(crate) fn current() -> anyhow::Result<&'static str> {
    static VERSION: OnceLock<String> = OnceLock::new();
    if let Some(v) = VERSION.get() {
        return Ok(v);
    }
    let lines = describe(super::loader::ebpf_object())?;
    Ok(VERSION.get_or_init(|| version_of(&lines)))
}

/// One line per pinned map and per program, sorted, so the order of declarations in the
/// object does not matter.
pub(crate) fn describe(object: &[u8]) -> anyhow::Result<Vec<String>> {
    let obj = Object::parse(object).context("parsing the embedded eBPF object")?;
    let mut lines = Vec::new();
    for (name, map) in &obj.maps {
        // Unpinned maps (.rodata, .bss, aya-log's ring) belong to one load, not to a set.
        if map.pinning() != PinningType::ByName {
            continue;
        }
        lines.push(format!(
            "map {name} type={} key={} value={} max_entries={} flags={:#x}",
            map.map_type(),
            map.key_size(),
            map.value_size(),
            map.max_entries(),
            map.map_flags()
        ));
    }
    for (name, program) in &obj.programs {
        let code = obj
            .functions
            .get(&program.function_key())
            .with_context(|| format!("program {name} has no code in the eBPF object"))?;
        let mut insns = Vec::with_capacity(code.instructions.len() * 8);
        for insn in &code.instructions {
            insns.push(insn.code);
            insns.push(insn.dst_reg() | (insn.src_reg() << 4));
            insns.extend_from_slice(&insn.off.to_le_bytes());
            insns.extend_from_slice(&insn.imm.to_le_bytes());
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &insns);
        lines.push(format!(
            "program {name} section={:?} code={}",
            program.section,
            hex(&digest.as_ref()[..8])
        ));
    }
    lines.sort();
    Ok(lines)
}

pub(crate) fn version_of(lines: &[String]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for line in lines {
        ctx.update(line.as_bytes());
        ctx.update(b"\n");
    }
    let mut v = hex(ctx.finish().as_ref());
    v.truncate(VERSION_HEX_DIGITS);
    v
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::pin;

    #[test]
    fn the_version_covers_every_pinned_map_and_every_program() {
        let lines = describe(super::super::loader::ebpf_object()).unwrap();
        for map in pin::MAPS.iter().chain(pin::LATER_MAPS.iter()) {
            assert!(
                lines.iter().any(|l| l.starts_with(&format!("map {map} "))),
                "{map} is not part of the layout version: {lines:#?}"
            );
        }
        for program in pin::HOOKS
            .iter()
            .map(|h| h.program)
            .chain([hms_ebpf::program_names::SK_MSG])
        {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("program {program} "))),
                "{program} is not part of the layout version: {lines:#?}"
            );
        }
        // The size of a record is in it: OrigDst is the value of HMS_ORIG_BY_COOKIE.
        let orig = size_of::<hms_ebpf::OrigDst>();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("map HMS_ORIG_BY_COOKIE ")
                    && l.contains(&format!(" value={orig} "))),
            "{lines:#?}"
        );
    }

    #[test]
    fn any_change_of_a_line_changes_the_version() {
        let lines = describe(super::super::loader::ebpf_object()).unwrap();
        let v = version_of(&lines);
        assert_eq!(v.len(), VERSION_HEX_DIGITS);
        assert_eq!(current().unwrap(), v, "stable across calls");
        for i in 0..lines.len() {
            let mut changed = lines.clone();
            changed[i].push('1');
            assert_ne!(version_of(&changed), v, "changing {:?}", lines[i]);
        }
        let mut fewer = lines.clone();
        fewer.pop();
        assert_ne!(version_of(&fewer), v);
    }
}
