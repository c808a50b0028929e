//! No Apple target can be built on the machines that build owsfs, so this test
//! stands in for a macOS build. It parses every Rust source of the workspace,
//! following `mod` declarations from each crate's roots, lists every call that
//! only Linux offers (the markers below), and checks:
//! - that each sits in code a macOS build does not compile
//!   (`cfg(target_os = "linux")` on it, on an enclosing item, or on its file);
//! - that outside tests each sits in this crate (`sys/src`), so that every
//!   production use of Linux has its fallback in one place;
//! - that every Linux-gated item and statement in `sys/src` has a twin of the
//!   same name (or a sibling statement) that macOS compiles: the fallback.
//!
//! The markers come from the `cfg`s of libc 0.2 and rustix 1.1 for the Apple
//! targets, plus the paths and tools only Linux has. A new Linux-only call
//! should be added here when it is first used.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Items that a macOS build of libc or rustix lacks, or that mean something
/// else there. A path matches when it equals one of these or extends it.
const MARKERS: &[&str] = &[
    "libc::O_PATH",
    "libc::O_TMPFILE",
    "libc::O_DIRECT",
    "libc::O_NOATIME",
    "libc::O_LARGEFILE",
    "libc::syncfs",
    "libc::fdatasync",
    "libc::sync_file_range",
    "libc::SYNC_FILE_RANGE_WRITE",
    "libc::name_to_handle_at",
    "libc::open_by_handle_at",
    "libc::file_handle",
    "libc::AT_EMPTY_PATH",
    "libc::setfsuid",
    "libc::setfsgid",
    "libc::prctl",
    "libc::PR_SET_PDEATHSIG",
    "libc::fallocate",
    "libc::FALLOC_FL_KEEP_SIZE",
    "libc::FALLOC_FL_PUNCH_HOLE",
    "libc::FALLOC_FL_COLLAPSE_RANGE",
    "libc::FALLOC_FL_INSERT_RANGE",
    "libc::FALLOC_FL_ZERO_RANGE",
    "libc::copy_file_range",
    "libc::renameat2",
    "libc::RENAME_NOREPLACE",
    "libc::RENAME_EXCHANGE",
    "libc::RENAME_WHITEOUT",
    "libc::statx",
    "libc::splice",
    "libc::lgetxattr",
    "libc::lsetxattr",
    "libc::llistxattr",
    "libc::lremovexattr",
    // macOS has these four, with two more arguments (position, options).
    "libc::getxattr",
    "libc::setxattr",
    "libc::listxattr",
    "libc::removexattr",
    "libc::TCGETS",
    "libc::SYS_io_setup",
    "libc::SYS_io_submit",
    "libc::SYS_io_getevents",
    "libc::SYS_io_destroy",
    "libc::mount",
    "libc::umount2",
    "rustix::fs::syncfs",
    "rustix::fs::fdatasync",
    "rustix::fs::statx",
    "rustix::fs::StatxFlags",
    "rustix::fs::Statx",
    "rustix::fs::copy_file_range",
    "rustix::fs::fadvise",
    "rustix::fs::Advice",
    "rustix::fs::ioctl_getflags",
    "rustix::fs::ioctl_setflags",
    "rustix::fs::IFlags",
    "rustix::fs::RawDir",
    "rustix::fs::sendfile",
    "rustix::fs::memfd_create",
    "rustix::fs::openat2",
    "rustix::fs::inotify",
    "rustix::fs::OFlags::PATH",
    "rustix::fs::OFlags::TMPFILE",
    "rustix::fs::OFlags::NOATIME",
    "rustix::fs::OFlags::DIRECT",
    "rustix::fs::OFlags::LARGEFILE",
    "rustix::fs::FallocateFlags::KEEP_SIZE",
    "rustix::fs::FallocateFlags::PUNCH_HOLE",
    "rustix::fs::FallocateFlags::COLLAPSE_RANGE",
    "rustix::fs::FallocateFlags::INSERT_RANGE",
    "rustix::fs::FallocateFlags::ZERO_RANGE",
    "rustix::fs::RenameFlags::WHITEOUT",
    "rustix::fs::AtFlags::EMPTY_PATH",
    // Apple: no mknodat in rustix; major/minor take and give i32 (`owsfs_sys::fs` has the
    // portable forms). (rustix's fallocate exists there, for mode 0 only: the core calls
    // `owsfs_sys::fs::fallocate`.)
    "rustix::fs::mknodat",
    "libc::major",
    "libc::minor",
    "rustix::pipe::pipe_with",
    // macOS says ENOATTR for a missing extended attribute.
    "libc::ENODATA",
    "rustix::io::Errno::NODATA",
    "rustix::mount",
    "rustix::process::set_parent_process_death_signal",
    "rustix::thread::set_thread_uid",
    "rustix::thread::set_thread_gid",
    "std::os::linux",
];

/// How strings that name what only Linux has begin: procfs, sysfs, its FUSE device
/// and mount helper. (A message that mentions one is not a call.)
const STRING_MARKERS: &[&str] = &["/proc/", "/sys/", "/dev/fuse", "fusermount"];

/// The crates of the workspace, as directories beside `sys`.
const CRATES: &[&str] = &[
    ".", "sys", "fuse", "journal", "store", "local", "sync", "hydrate", "torture",
];

/// Crates that are test harnesses as a whole.
const TEST_CRATES: &[&str] = &["torture"];

/// Three-valued logic for a `cfg` predicate evaluated for one target.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tri {
    Yes,
    No,
    Unknown,
}

impl Tri {
    fn not(self) -> Tri {
        match self {
            Tri::Yes => Tri::No,
            Tri::No => Tri::Yes,
            Tri::Unknown => Tri::Unknown,
        }
    }
}

/// Evaluates a `cfg` predicate for a target whose `target_os` is `os` (a Unix).
/// `test` counts as set, since a test build is a build too.
fn eval(meta: &syn::Meta, os: &str) -> Tri {
    let name = meta
        .path()
        .get_ident()
        .map(|i| i.to_string())
        .unwrap_or_default();
    match meta {
        syn::Meta::Path(_) => match name.as_str() {
            "unix" | "test" | "debug_assertions" => Tri::Yes,
            "windows" => Tri::No,
            _ => Tri::Unknown,
        },
        syn::Meta::NameValue(nv) => {
            let value = match &nv.value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => s.value(),
                _ => return Tri::Unknown,
            };
            match name.as_str() {
                "target_os" => {
                    if value == os {
                        Tri::Yes
                    } else {
                        Tri::No
                    }
                }
                "target_family" => {
                    if value == "unix" {
                        Tri::Yes
                    } else {
                        Tri::No
                    }
                }
                _ => Tri::Unknown,
            }
        }
        syn::Meta::List(list) => {
            let parsed = list.parse_args_with(
                syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
            );
            let Ok(args) = parsed else {
                return Tri::Unknown;
            };
            let values: Vec<Tri> = args.iter().map(|m| eval(m, os)).collect();
            match name.as_str() {
                "not" => values.first().map_or(Tri::Unknown, |v| v.not()),
                "all" => {
                    if values.contains(&Tri::No) {
                        Tri::No
                    } else if values.iter().all(|v| *v == Tri::Yes) {
                        Tri::Yes
                    } else {
                        Tri::Unknown
                    }
                }
                "any" => {
                    if values.contains(&Tri::Yes) {
                        Tri::Yes
                    } else if values.iter().all(|v| *v == Tri::No) {
                        Tri::No
                    } else {
                        Tri::Unknown
                    }
                }
                _ => Tri::Unknown,
            }
        }
    }
}

/// Evaluates the `cfg` attributes of one node for target `os`: all must hold.
fn cfgs(attrs: &[syn::Attribute], os: &str) -> Tri {
    let mut out = Tri::Yes;
    for attr in attrs {
        if !attr.path().is_ident("cfg") {
            continue;
        }
        let Ok(meta) = attr.parse_args::<syn::Meta>() else {
            return Tri::Unknown;
        };
        match eval(&meta, os) {
            Tri::No => return Tri::No,
            Tri::Unknown => out = Tri::Unknown,
            Tri::Yes => {}
        }
    }
    out
}

fn is_test_attr(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("test")
            || (a.path().is_ident("cfg")
                && a.parse_args::<syn::Meta>().is_ok_and(|m| mentions_test(&m)))
    })
}

fn mentions_test(meta: &syn::Meta) -> bool {
    match meta {
        syn::Meta::Path(p) => p.is_ident("test"),
        syn::Meta::List(list) if list.path.is_ident("all") => list
            .parse_args_with(
                syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
            )
            .is_ok_and(|args| args.iter().any(mentions_test)),
        _ => false,
    }
}

/// Where the scan stands: what a macOS build skips, and whether this is test code.
#[derive(Clone, Copy, Default)]
struct Scope {
    gated: bool,
    test: bool,
}

impl Scope {
    fn enter(self, attrs: &[syn::Attribute]) -> Scope {
        Scope {
            gated: self.gated || cfgs(attrs, "macos") == Tri::No,
            test: self.test || is_test_attr(attrs),
        }
    }
}

struct Finding {
    file: PathBuf,
    line: usize,
    what: String,
    scope: Scope,
}

struct Scanner<'a> {
    file: &'a Path,
    in_sys: bool,
    scope: Scope,
    /// The file's `use` declarations: local name to full path.
    uses: &'a HashMap<String, Vec<String>>,
    findings: Vec<Finding>,
    /// `mod name;` declarations: the scope they are declared in.
    child_mods: Vec<(syn::ItemMod, Scope, Vec<String>)>,
    inline_mods: Vec<String>,
    /// In `sys/src`: the Linux-gated items and statements without a macOS twin.
    missing_twins: Vec<(usize, String)>,
}

fn line_of(span: proc_macro2::Span) -> usize {
    span.start().line
}

impl Scanner<'_> {
    fn check_path(&mut self, segments: &[String], line: usize) {
        if segments.is_empty() {
            return;
        }
        let mut full: Vec<String> = match self.uses.get(&segments[0]) {
            Some(prefix) if segments[0] != "crate" && segments[0] != "self" => prefix.clone(),
            _ => vec![segments[0].clone()],
        };
        full.extend(segments[1..].iter().cloned());
        let joined = full.join("::");
        for marker in MARKERS {
            if joined == *marker || joined.starts_with(&format!("{marker}::")) {
                self.report(line, format!("`{marker}`"));
                return;
            }
        }
    }

    fn check_str(&mut self, value: &str, line: usize) {
        let bare = ["/proc", "/sys"].contains(&value);
        for marker in STRING_MARKERS {
            if bare || value.starts_with(marker) {
                self.report(line, format!("the string {value:?}"));
                return;
            }
        }
    }

    fn report(&mut self, line: usize, what: String) {
        self.findings.push(Finding {
            file: self.file.to_path_buf(),
            line,
            what,
            scope: self.scope,
        });
    }

    fn with_scope(&mut self, attrs: &[syn::Attribute], f: impl FnOnce(&mut Self)) {
        let saved = self.scope;
        self.scope = saved.enter(attrs);
        f(self);
        self.scope = saved;
    }

    /// Macro bodies are tokens: scan their paths and string literals.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < trees.len() {
            match &trees[i] {
                TokenTree::Group(g) => self.scan_tokens(g.stream()),
                TokenTree::Literal(lit) => {
                    if let Ok(syn::Lit::Str(s)) = syn::parse_str::<syn::Lit>(&lit.to_string()) {
                        self.check_str(&s.value(), line_of(lit.span()));
                    }
                }
                TokenTree::Ident(ident) => {
                    let after_dot =
                        i > 0 && matches!(&trees[i - 1], TokenTree::Punct(p) if p.as_char() == '.');
                    let mut segments = vec![ident.to_string()];
                    let mut j = i + 1;
                    while j + 2 < trees.len() + 1
                        && j + 1 < trees.len()
                        && matches!(&trees[j], TokenTree::Punct(p) if p.as_char() == ':')
                        && matches!(&trees[j + 1], TokenTree::Punct(p) if p.as_char() == ':')
                    {
                        match trees.get(j + 2) {
                            Some(TokenTree::Ident(next)) => {
                                segments.push(next.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    if !after_dot {
                        self.check_path(&segments, line_of(ident.span()));
                    }
                    i = j;
                    continue;
                }
                TokenTree::Punct(_) => {}
            }
            i += 1;
        }
    }

    /// In `sys/src`, every Linux-gated item needs a same-named twin that
    /// macOS compiles, and every Linux-gated statement a sibling that macOS
    /// compiles.
    fn check_twins(&mut self, named: &[(String, &[syn::Attribute], usize)]) {
        if !self.in_sys || self.scope.test {
            return;
        }
        for (name, attrs, line) in named {
            if cfgs(attrs, "macos") != Tri::No || cfgs(attrs, "linux") == Tri::No {
                continue;
            }
            let twin = named.iter().any(|(other, other_attrs, _)| {
                other == name && cfgs(other_attrs, "macos") != Tri::No
            });
            if !twin {
                self.missing_twins.push((*line, name.clone()));
            }
        }
    }
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::ExternCrate(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::ForeignMod(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::TraitAlias(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Union(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// The name a fallback twin shares with its Linux item; `use` items need none.
fn item_name(item: &syn::Item) -> Option<String> {
    let public = |vis: &syn::Visibility| !matches!(vis, syn::Visibility::Inherited);
    let exported = match item {
        syn::Item::Const(i) => public(&i.vis),
        syn::Item::Enum(i) => public(&i.vis),
        syn::Item::Fn(i) => public(&i.vis),
        syn::Item::Mod(i) => public(&i.vis),
        syn::Item::Static(i) => public(&i.vis),
        syn::Item::Struct(i) => public(&i.vis),
        syn::Item::Trait(i) => public(&i.vis),
        syn::Item::Type(i) => public(&i.vis),
        _ => true,
    };
    // A private item serves the gated public ones beside it; their twins are the fallback.
    if !exported {
        return None;
    }
    Some(match item {
        syn::Item::Const(i) => i.ident.to_string(),
        syn::Item::Enum(i) => i.ident.to_string(),
        syn::Item::Fn(i) => i.sig.ident.to_string(),
        syn::Item::Mod(i) => i.ident.to_string(),
        syn::Item::Static(i) => i.ident.to_string(),
        syn::Item::Struct(i) => i.ident.to_string(),
        syn::Item::Trait(i) => i.ident.to_string(),
        syn::Item::Type(i) => i.ident.to_string(),
        syn::Item::Impl(i) => {
            let ty = &i.self_ty;
            let tr = i.trait_.as_ref().map(|(_, p, _)| p);
            format!("impl {} for {}", quote_path(tr), quote_type(ty))
        }
        _ => return None,
    })
}

fn quote_path(path: Option<&syn::Path>) -> String {
    path.map(|p| {
        p.segments
            .iter()
            .map(|s| s.ident.to_string())
            .collect::<Vec<_>>()
            .join("::")
    })
    .unwrap_or_default()
}

fn quote_type(ty: &syn::Type) -> String {
    match ty {
        syn::Type::Path(p) => quote_path(Some(&p.path)),
        _ => String::from("?"),
    }
}

fn expr_attrs(expr: &syn::Expr) -> &[syn::Attribute] {
    use syn::Expr as E;
    match expr {
        E::Array(e) => &e.attrs,
        E::Assign(e) => &e.attrs,
        E::Async(e) => &e.attrs,
        E::Await(e) => &e.attrs,
        E::Binary(e) => &e.attrs,
        E::Block(e) => &e.attrs,
        E::Break(e) => &e.attrs,
        E::Call(e) => &e.attrs,
        E::Cast(e) => &e.attrs,
        E::Closure(e) => &e.attrs,
        E::Const(e) => &e.attrs,
        E::Continue(e) => &e.attrs,
        E::Field(e) => &e.attrs,
        E::ForLoop(e) => &e.attrs,
        E::Group(e) => &e.attrs,
        E::If(e) => &e.attrs,
        E::Index(e) => &e.attrs,
        E::Let(e) => &e.attrs,
        E::Lit(e) => &e.attrs,
        E::Loop(e) => &e.attrs,
        E::Macro(e) => &e.attrs,
        E::Match(e) => &e.attrs,
        E::MethodCall(e) => &e.attrs,
        E::Paren(e) => &e.attrs,
        E::Path(e) => &e.attrs,
        E::Range(e) => &e.attrs,
        E::Reference(e) => &e.attrs,
        E::Repeat(e) => &e.attrs,
        E::Return(e) => &e.attrs,
        E::Struct(e) => &e.attrs,
        E::Try(e) => &e.attrs,
        E::TryBlock(e) => &e.attrs,
        E::Tuple(e) => &e.attrs,
        E::Unary(e) => &e.attrs,
        E::Unsafe(e) => &e.attrs,
        E::While(e) => &e.attrs,
        E::Yield(e) => &e.attrs,
        _ => &[],
    }
}

fn stmt_attrs(stmt: &syn::Stmt) -> &[syn::Attribute] {
    match stmt {
        syn::Stmt::Local(l) => &l.attrs,
        syn::Stmt::Item(i) => item_attrs(i),
        syn::Stmt::Expr(e, _) => expr_attrs(e),
        syn::Stmt::Macro(m) => &m.attrs,
    }
}

impl<'ast> Visit<'ast> for Scanner<'_> {
    fn visit_file(&mut self, file: &'ast syn::File) {
        self.with_scope(&file.attrs, |s| {
            let named: Vec<_> = file
                .items
                .iter()
                .filter_map(|i| item_name(i).map(|n| (n, item_attrs(i), item_line(i))))
                .collect();
            s.check_twins(&named);
            for item in &file.items {
                s.visit_item(item);
            }
        });
    }

    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = item_attrs(item);
        self.with_scope(attrs, |s| match item {
            syn::Item::Mod(m) if m.content.is_none() => {
                s.child_mods
                    .push((m.clone(), s.scope, s.inline_mods.clone()));
            }
            syn::Item::Mod(m) => {
                s.inline_mods.push(m.ident.to_string());
                let named: Vec<_> = m
                    .content
                    .iter()
                    .flat_map(|(_, items)| items)
                    .filter_map(|i| item_name(i).map(|n| (n, item_attrs(i), item_line(i))))
                    .collect();
                s.check_twins(&named);
                syn::visit::visit_item(s, item);
                s.inline_mods.pop();
            }
            syn::Item::Use(u) => {
                let mut paths = Vec::new();
                flatten_use(&u.tree, &mut Vec::new(), &mut paths);
                for (_, full, line) in paths {
                    s.check_path(&full, line);
                }
            }
            syn::Item::Impl(imp) => {
                let named: Vec<_> = imp
                    .items
                    .iter()
                    .filter_map(|i| match i {
                        syn::ImplItem::Fn(f) => Some((
                            f.sig.ident.to_string(),
                            &f.attrs[..],
                            line_of(f.sig.ident.span()),
                        )),
                        syn::ImplItem::Const(c) => {
                            Some((c.ident.to_string(), &c.attrs[..], line_of(c.ident.span())))
                        }
                        _ => None,
                    })
                    .collect();
                s.check_twins(&named);
                syn::visit::visit_item(s, item);
            }
            _ => syn::visit::visit_item(s, item),
        });
    }

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        let attrs: &[syn::Attribute] = match item {
            syn::ImplItem::Const(i) => &i.attrs,
            syn::ImplItem::Fn(i) => &i.attrs,
            syn::ImplItem::Type(i) => &i.attrs,
            syn::ImplItem::Macro(i) => &i.attrs,
            _ => &[],
        };
        self.with_scope(attrs, |s| syn::visit::visit_impl_item(s, item));
    }

    fn visit_trait_item(&mut self, item: &'ast syn::TraitItem) {
        let attrs: &[syn::Attribute] = match item {
            syn::TraitItem::Const(i) => &i.attrs,
            syn::TraitItem::Fn(i) => &i.attrs,
            syn::TraitItem::Type(i) => &i.attrs,
            syn::TraitItem::Macro(i) => &i.attrs,
            _ => &[],
        };
        self.with_scope(attrs, |s| syn::visit::visit_trait_item(s, item));
    }

    fn visit_block(&mut self, block: &'ast syn::Block) {
        if self.in_sys && !self.scope.test {
            let linux_only = block
                .stmts
                .iter()
                .find(|st| cfgs(stmt_attrs(st), "macos") == Tri::No);
            let fallback = block.stmts.iter().any(|st| {
                let attrs = stmt_attrs(st);
                cfgs(attrs, "linux") == Tri::No && cfgs(attrs, "macos") != Tri::No
            });
            if let Some(st) = linux_only
                && !fallback
                && !matches!(st, syn::Stmt::Item(syn::Item::Use(_)))
            {
                let line = line_of(syn::spanned::Spanned::span(st));
                self.missing_twins
                    .push((line, String::from("a gated statement")));
            }
        }
        syn::visit::visit_block(self, block);
    }

    fn visit_stmt(&mut self, stmt: &'ast syn::Stmt) {
        self.with_scope(stmt_attrs(stmt), |s| syn::visit::visit_stmt(s, stmt));
    }

    fn visit_expr(&mut self, expr: &'ast syn::Expr) {
        self.with_scope(expr_attrs(expr), |s| syn::visit::visit_expr(s, expr));
    }

    fn visit_arm(&mut self, arm: &'ast syn::Arm) {
        self.with_scope(&arm.attrs, |s| syn::visit::visit_arm(s, arm));
    }

    fn visit_field(&mut self, field: &'ast syn::Field) {
        self.with_scope(&field.attrs, |s| syn::visit::visit_field(s, field));
    }

    fn visit_field_value(&mut self, field: &'ast syn::FieldValue) {
        self.with_scope(&field.attrs, |s| syn::visit::visit_field_value(s, field));
    }

    fn visit_variant(&mut self, variant: &'ast syn::Variant) {
        self.with_scope(&variant.attrs, |s| syn::visit::visit_variant(s, variant));
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        let line = path.segments.first().map_or(0, |s| line_of(s.ident.span()));
        self.check_path(&segments, line);
        syn::visit::visit_path(self, path);
    }

    fn visit_lit_str(&mut self, lit: &'ast syn::LitStr) {
        self.check_str(&lit.value(), line_of(lit.span()));
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.visit_path(&mac.path);
        self.scan_tokens(mac.tokens.clone());
    }

    fn visit_attribute(&mut self, _attr: &'ast syn::Attribute) {
        // Doc comments and `cfg`s name Linux things without calling them.
    }
}

fn item_line(item: &syn::Item) -> usize {
    line_of(syn::spanned::Spanned::span(item))
}

/// Flattens a `use` tree into (local name, full path, line) triples.
fn flatten_use(
    tree: &syn::UseTree,
    prefix: &mut Vec<String>,
    out: &mut Vec<(String, Vec<String>, usize)>,
) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten_use(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let mut full = prefix.clone();
            let name = n.ident.to_string();
            if name != "self" {
                full.push(name.clone());
            }
            let local = if name == "self" {
                prefix.last().cloned().unwrap_or_default()
            } else {
                name
            };
            out.push((local, full, line_of(n.ident.span())));
        }
        syn::UseTree::Rename(r) => {
            let mut full = prefix.clone();
            if r.ident != "self" {
                full.push(r.ident.to_string());
            }
            out.push((r.rename.to_string(), full, line_of(r.ident.span())));
        }
        syn::UseTree::Glob(g) => {
            out.push((
                String::from("*"),
                prefix.clone(),
                line_of(g.star_token.span),
            ));
        }
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten_use(t, prefix, out);
            }
        }
    }
}

/// Every `use` in a file, wherever it sits: local name to full path.
fn collect_uses(file: &syn::File) -> HashMap<String, Vec<String>> {
    struct Uses(Vec<(String, Vec<String>, usize)>);
    impl<'ast> Visit<'ast> for Uses {
        fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
            flatten_use(&u.tree, &mut Vec::new(), &mut self.0);
        }
    }
    let mut uses = Uses(Vec::new());
    uses.visit_file(file);
    let mut map = HashMap::new();
    for (local, full, _) in uses.0 {
        if local != "*" && !full.is_empty() {
            map.insert(local, full);
        }
    }
    map
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The files a crate's targets start from, each with its scope.
fn crate_roots(dir: &Path, test_crate: bool) -> Vec<(PathBuf, Scope)> {
    let mut roots = Vec::new();
    let plain = Scope {
        gated: false,
        test: test_crate,
    };
    let test = Scope {
        gated: false,
        test: true,
    };
    for name in ["src/lib.rs", "src/main.rs", "build.rs"] {
        let path = dir.join(name);
        if path.exists() {
            roots.push((path, plain));
        }
    }
    for (sub, scope) in [
        ("src/bin", plain),
        ("tests", test),
        ("benches", test),
        ("examples", test),
    ] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        let mut entries: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            if path.extension().is_some_and(|e| e == "rs") {
                roots.push((path, scope));
            } else if path.join("main.rs").exists() {
                roots.push((path.join("main.rs"), scope));
            }
        }
    }
    roots
}

/// The file a `mod name;` declared in `file` refers to.
fn child_file(file: &Path, is_root: bool, m: &syn::ItemMod, inline: &[String]) -> Option<PathBuf> {
    let dir = file.parent().unwrap();
    for attr in &m.attrs {
        if attr.path().is_ident("path")
            && let syn::Meta::NameValue(nv) = &attr.meta
            && let syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) = &nv.value
        {
            return Some(dir.join(s.value()));
        }
    }
    let stem = file.file_stem().unwrap().to_string_lossy();
    let mut base = if is_root || stem == "mod" {
        dir.to_path_buf()
    } else {
        dir.join(stem.as_ref())
    };
    for name in inline {
        base = base.join(name);
    }
    let name = m.ident.to_string();
    [
        base.join(format!("{name}.rs")),
        base.join(&name).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

struct Scan {
    findings: Vec<Finding>,
    missing_twins: Vec<(PathBuf, usize, String)>,
    files: usize,
}

fn scan_workspace() -> Scan {
    let root = workspace_root();
    // (file, scope, whether it is a crate root)
    let mut queue: VecDeque<(PathBuf, Scope, bool)> = VecDeque::new();
    for krate in CRATES {
        let test_crate = TEST_CRATES.contains(krate);
        let roots = crate_roots(&root.join(krate), test_crate);
        queue.extend(roots.into_iter().map(|(path, scope)| (path, scope, true)));
    }
    let mut seen: BTreeMap<PathBuf, ()> = BTreeMap::new();
    let mut scan = Scan {
        findings: Vec::new(),
        missing_twins: Vec::new(),
        files: 0,
    };
    let sys_src = root.join("sys/src");
    let this_file = root.join("sys/tests/linux_only.rs");
    while let Some((path, scope, is_root)) = queue.pop_front() {
        // This file names every marker, in strings.
        if path == this_file {
            continue;
        }
        let canonical = path
            .canonicalize()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A file reached twice (a shared test module) is scanned in the
        // first scope that reaches it; the roots are visited in order.
        if seen.insert(canonical.clone(), ()).is_some() {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let uses = collect_uses(&file);
        let mut scanner = Scanner {
            file: &path,
            in_sys: canonical.starts_with(&sys_src),
            scope,
            uses: &uses,
            findings: Vec::new(),
            child_mods: Vec::new(),
            inline_mods: Vec::new(),
            missing_twins: Vec::new(),
        };
        scanner.visit_file(&file);
        scan.files += 1;
        // A file-level `#![cfg]` gates the mods it declares too.
        let file_scope = scope.enter(&file.attrs);
        for (m, mod_scope, inline) in scanner.child_mods {
            let child = child_file(&path, is_root, &m, &inline)
                .unwrap_or_else(|| panic!("{}: mod {} has no file", path.display(), m.ident));
            let child_scope = Scope {
                gated: mod_scope.gated || file_scope.gated,
                test: mod_scope.test || file_scope.test,
            };
            queue.push_back((child, child_scope, false));
        }
        scan.findings.extend(scanner.findings);
        for (line, name) in scanner.missing_twins {
            scan.missing_twins.push((path.clone(), line, name));
        }
    }
    scan
}

fn relative(path: &Path) -> String {
    let root = workspace_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_linux_only_call_is_gated_and_production_ones_live_in_sys() {
    let scan = scan_workspace();
    let sys_src = workspace_root().join("sys/src");
    let mut ungated = String::new();
    let mut outside_sys = String::new();
    for f in &scan.findings {
        let line = format!("  {}:{}: {}\n", relative(&f.file), f.line, f.what);
        if !f.scope.gated {
            ungated.push_str(&line);
        } else if !f.scope.test && !f.file.starts_with(&sys_src) {
            outside_sys.push_str(&line);
        }
    }
    let mut report = String::new();
    if !ungated.is_empty() {
        let _ = writeln!(
            report,
            "Linux-only calls that a macOS build would compile (gate them with \
             cfg(target_os = \"linux\"), or call owsfs-sys):\n{ungated}"
        );
    }
    if !outside_sys.is_empty() {
        let _ = writeln!(
            report,
            "Linux-only calls in production code outside owsfs-sys (move them into \
             sys/src, beside a fallback):\n{outside_sys}"
        );
    }
    assert!(report.is_empty(), "{report}");
    // The scan must have seen the workspace, and the markers must still match
    // something: a scan that finds nothing proves nothing.
    assert!(scan.files > 150, "only {} files scanned", scan.files);
    let in_sys = scan
        .findings
        .iter()
        .filter(|f| f.file.starts_with(&sys_src))
        .count();
    assert!(
        in_sys > 20,
        "only {in_sys} Linux-only calls found in sys/src"
    );
}

#[test]
fn every_linux_item_in_sys_has_a_fallback_twin() {
    let scan = scan_workspace();
    let mut report = String::new();
    for (file, line, name) in &scan.missing_twins {
        let _ = writeln!(report, "  {}:{line}: {name}", relative(file));
    }
    assert!(
        report.is_empty(),
        "Linux-gated code in sys/src without a fallback that macOS compiles:\n{report}"
    );
}

/// The scanner itself: a marker in each position it must see, and the gates
/// it must honour.
#[test]
fn the_scanner_sees_markers_in_paths_uses_macros_and_strings() {
    let text = r#"
        use rustix::fs::{syncfs, OFlags};
        use libc as c;
        fn a(fd: i32) { syncfs(fd); }
        fn b() { let _ = OFlags::PATH; let _ = c::O_DIRECT; }
        fn d() { println!("{}", rustix::fs::fdatasync(x)); }
        fn e() { let _ = std::fs::read("/proc/self/mountinfo"); }
        #[cfg(target_os = "linux")]
        fn f() { syncfs(0); }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        fn g() { syncfs(0); }
        #[cfg(not(target_os = "linux"))]
        fn h() { x.syncfs(); }
        fn i() { #[cfg(target_os = "linux")] { syncfs(0); } }
    "#;
    let file = syn::parse_file(text).unwrap();
    let uses = collect_uses(&file);
    let mut scanner = Scanner {
        file: Path::new("x.rs"),
        in_sys: false,
        scope: Scope::default(),
        uses: &uses,
        findings: Vec::new(),
        child_mods: Vec::new(),
        inline_mods: Vec::new(),
        missing_twins: Vec::new(),
    };
    scanner.visit_file(&file);
    assert!(
        scanner.missing_twins.is_empty(),
        "outside sys/src no twin is asked for"
    );
    let lines: Vec<(usize, bool)> = scanner
        .findings
        .iter()
        .map(|f| (f.line, f.scope.gated))
        .collect();
    assert_eq!(
        lines,
        vec![
            (2, false),
            (4, false),
            (5, false),
            (5, false),
            (6, false),
            (7, false),
            (9, true),
            (11, true),
            (14, true),
        ],
        "{:?}",
        scanner.findings.iter().map(|f| &f.what).collect::<Vec<_>>()
    );
}

/// In `sys/src`, a public Linux item without a twin that macOS compiles is reported; one
/// with a twin, or a private helper, is not.
#[test]
fn the_scanner_asks_sys_for_fallback_twins() {
    let text = r#"
        #[cfg(target_os = "linux")]
        pub fn with_twin() {}
        #[cfg(not(target_os = "linux"))]
        pub fn with_twin() {}
        #[cfg(target_os = "linux")]
        pub fn alone() {}
        #[cfg(target_os = "linux")]
        fn private_helper() {}
        #[cfg(target_os = "linux")]
        pub const C: i32 = 1;
        #[cfg(target_os = "macos")]
        pub const C: i32 = 2;
        #[cfg(not(any(target_os = "linux", target_os = "macos")))]
        pub const C: i32 = 3;
        pub fn f() {
            #[cfg(target_os = "linux")]
            g();
        }
        pub fn h() {
            #[cfg(target_os = "linux")]
            g();
            #[cfg(not(target_os = "linux"))]
            k();
        }
    "#;
    let file = syn::parse_file(text).unwrap();
    let uses = collect_uses(&file);
    let mut scanner = Scanner {
        file: Path::new("sys/src/x.rs"),
        in_sys: true,
        scope: Scope::default(),
        uses: &uses,
        findings: Vec::new(),
        child_mods: Vec::new(),
        inline_mods: Vec::new(),
        missing_twins: Vec::new(),
    };
    scanner.visit_file(&file);
    let missing: Vec<(usize, &str)> = scanner
        .missing_twins
        .iter()
        .map(|(line, name)| (*line, name.as_str()))
        .collect();
    assert_eq!(missing, vec![(6, "alone"), (17, "a gated statement")]);
}
