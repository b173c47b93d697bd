# The front door. `make demo` runs the main job; `make test` runs every test.
# Both install what they need on a fresh Debian bookworm machine (as root).

CARGO ?= cargo
RELEASE := target/release

.PHONY: all build deps test test-unit check-deps real-kernel demo demo-fake bench bench-real-kernel bench-migrate bench-scale regenerate-layouts install clean fuzz

all: build

deps:
	bash images/install-deps.sh

build:
	$(CARGO) build --release --workspace

# Everything CI runs: dependency check, unit and integration tests on fake hosts,
# then the real-kernel tier in the emulated host.
test: deps check-deps test-unit real-kernel

test-unit:
	$(CARGO) test --workspace

# The rust-vmm set must resolve to one version each.
check-deps:
	@mkdir -p target
	@$(CARGO) tree --workspace --all-targets -e normal,build --prefix none -f '{p}' 2>/dev/null | sed 's/ (.*//' | sort -u > target/deps.txt; \
	fail=0; for c in vfio-ioctls vfio-bindings vm-memory vmm-sys-util kvm-ioctls kvm-bindings; do \
	  n=$$(grep -c "^$$c v" target/deps.txt); \
	  if [ "$$n" -gt 1 ]; then echo "check-deps: $$n versions of $$c:"; grep "^$$c v" target/deps.txt; fail=1; fi; \
	done; [ $$fail = 0 ] && echo "check-deps: one version each of vfio-ioctls, vfio-bindings, vm-memory, vmm-sys-util, kvm-ioctls, kvm-bindings"

# Two boots: the scenario tests and checks, then libvirt end to end from a Debian root
# filesystem (built once, ~90 s, cached under build/images).
real-kernel: deps
	bash tests/real-kernel/run.sh
	bash tests/real-kernel/run.sh --libvirt

# Capture the fake layouts from the emulated host into vf-provisioner/layouts/.
regenerate-layouts: deps
	REGENERATE_LAYOUTS=1 bash tests/real-kernel/run.sh

demo: deps
	bash tests/real-kernel/run.sh --demo

# The same walk-through on a fake host (no QEMU needed).
demo-fake: build
	bash tests/demo-fake.sh

bench: build bench-real-kernel bench-migrate
	$(CARGO) build --release -p integration-tests
	$(RELEASE)/bench-list 64 64 15
	$(CARGO) build --release -p vm-agent
	$(RELEASE)/bench-agent 8 20 5
	$(CARGO) bench -p vfio-manager --bench daemon
	$(CARGO) bench -p libvirt-hooks --bench hook
	$(CARGO) bench -p mediated-dev --bench migration

bench-real-kernel: deps
	bash tests/real-kernel/run.sh --bench

# QEMU's downtime and total time for the live migration of the same nested VM
# without and with an mtty mdev, in one emulated-host boot.
bench-migrate: deps
	bash tests/real-kernel/run.sh --migrate

# Restore, provision, release and disable with SCALE_PFS (12) igb PFs, 84 VFs, beside
# the bare sysfs writes, in one emulated-host boot. Not part of CI or `make bench`.
bench-scale: deps
	bash tests/real-kernel/run.sh --scale

# Each fuzz target for FUZZ_S seconds (cargo-fuzz, nightly toolchain). New inputs go
# to build/fuzz/<target>; the committed seeds in vfio-manager/fuzz/corpus are read only.
# A crash stops the run and leaves its input under vfio-manager/fuzz/artifacts/. No
# sanitizer: the targets are safe Rust looking for panics, overflows (debug
# assertions are on) and unbounded allocations; ASan would triple the build (SQLite's
# C) and halve the runs.
FUZZ_S ?= 60
FUZZ_TARGETS := ids config domain_xml dbus_request migration_stream agent_frame
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p build/fuzz/$$t; \
	  echo "fuzz: $$t for $(FUZZ_S) s"; \
	  $(CARGO) +nightly fuzz run --sanitizer none --fuzz-dir vfio-manager/fuzz $$t build/fuzz/$$t vfio-manager/fuzz/corpus/$$t \
	    -- -max_total_time=$(FUZZ_S) -max_len=65536 -print_final_stats=1 > build/fuzz/$$t.log 2>&1; rc=$$?; \
	  grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|==[0-9]+==|SUMMARY)' build/fuzz/$$t.log | tail -n 4; \
	  [ $$rc = 0 ] || { tail -n 40 build/fuzz/$$t.log; exit 1; }; \
	done

install: build
	install -D -m 0755 $(RELEASE)/vfctl $(DESTDIR)/usr/local/bin/vfctl
	install -D -m 0755 $(RELEASE)/vfio-managerd $(DESTDIR)/usr/bin/vfio-managerd
	install -D -m 0644 vfio-manager/dist/vfio-manager.service $(DESTDIR)/lib/systemd/system/vfio-manager.service
	install -D -m 0644 vfio-manager/dist/org.vfiomanager.VfioManager1.conf $(DESTDIR)/usr/share/dbus-1/system.d/org.vfiomanager.VfioManager1.conf
	mkdir -p $(DESTDIR)/usr/local/share/man/man1 $(DESTDIR)/usr/share/bash-completion/completions
	$(RELEASE)/vfctl generate man > $(DESTDIR)/usr/local/share/man/man1/vfctl.1
	mkdir -p $(DESTDIR)/usr/local/share/man/man8
	$(RELEASE)/vfctl generate daemon-man > $(DESTDIR)/usr/local/share/man/man8/vfio-managerd.8
	$(RELEASE)/vfctl generate bash > $(DESTDIR)/usr/share/bash-completion/completions/vfctl
	# The libvirt hook: libvirt >= 6.5 runs every script in qemu.d (restart libvirtd to pick it up).
	install -D -m 0755 $(RELEASE)/vfio-manager-hook $(DESTDIR)/usr/libexec/vfio-manager/vfio-manager-hook
	mkdir -p $(DESTDIR)/etc/libvirt/hooks/qemu.d
	ln -sf /usr/libexec/vfio-manager/vfio-manager-hook $(DESTDIR)/etc/libvirt/hooks/qemu.d/vfio-manager

clean:
	$(CARGO) clean
	rm -rf build
