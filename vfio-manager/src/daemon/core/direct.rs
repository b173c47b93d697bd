//! The direct requests service: enable and disable VFs, bind and unbind, each
//! through the guarded provisioner (which asks the gate with what the table knows),
//! one at a time, recorded as an intent and audited.

use vf_provisioner::PciAddress;

use super::{failed, moved, verdict, Direct, Guards};
use crate::api::ApiError;

impl Direct<'_> {
    pub fn enable_vfs(
        &self,
        pf: &str,
        count: Option<u32>,
        uid: u32,
    ) -> Result<Vec<String>, ApiError> {
        let pf: PciAddress = pf.parse()?;
        self.run("enable", uid, &pf, || self.enable_now(&pf, count))
    }

    /// Enables each PF's VFs, the PFs side by side (start-up's restore): one PF's
    /// enable waits on that device (VF probes, a driver's reset), not on the others.
    /// Each is retried as [`super::retry`] does, recorded and audited.
    pub(super) fn enable_each(
        &self,
        pfs: &[(PciAddress, u32)],
    ) -> Vec<Result<Vec<String>, ApiError>> {
        let _alone = self.exclusive();
        std::thread::scope(|s| {
            let jobs: Vec<_> = pfs
                .iter()
                .map(|(pf, n)| {
                    s.spawn(move || {
                        super::retry(|| {
                            self.recorded("enable", 0, pf, || self.enable_now(pf, Some(*n)))
                        })
                    })
                })
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join().unwrap_or_else(|_| {
                        Err(ApiError::Failed("an enable thread panicked".into()))
                    })
                })
                .collect()
        })
    }

    fn enable_now(&self, pf: &PciAddress, count: Option<u32>) -> Result<Vec<String>, ApiError> {
        Ok(self
            .guarded
            .enable_vfs(pf, count)?
            .iter()
            .map(ToString::to_string)
            .collect())
    }

    pub fn disable_vfs(&self, pf: &str, uid: u32) -> Result<Vec<String>, ApiError> {
        let pf: PciAddress = pf.parse()?;
        self.run("disable", uid, &pf, || {
            self.guarded.disable_vfs(&pf)?;
            Ok(vec![pf.to_string()])
        })
    }

    pub fn bind(&self, addr: &str, whole_group: bool, uid: u32) -> Result<Vec<String>, ApiError> {
        let a: PciAddress = addr.parse()?;
        self.run("bind", uid, &a, || {
            Ok(moved(self.guarded.bind_vfio(&a, whole_group)?))
        })
    }

    pub fn unbind(&self, addr: &str, whole_group: bool, uid: u32) -> Result<Vec<String>, ApiError> {
        let a: PciAddress = addr.parse()?;
        self.run("unbind", uid, &a, || {
            Ok(moved(self.guarded.unbind(&a, whole_group, None)?))
        })
    }

    /// One direct operation: serialized, recorded as an intent, audited.
    pub(super) fn run(
        &self,
        op: &str,
        uid: u32,
        dev: &PciAddress,
        f: impl FnOnce() -> Result<Vec<String>, ApiError>,
    ) -> Result<Vec<String>, ApiError> {
        let _alone = self.exclusive();
        self.recorded(op, uid, dev, f)
    }

    /// `f` as operation `op` on `dev`: an intent around it, timed and audited; the
    /// caller holds the lock that keeps other operations off.
    fn recorded(
        &self,
        op: &str,
        uid: u32,
        dev: &PciAddress,
        f: impl FnOnce() -> Result<Vec<String>, ApiError>,
    ) -> Result<Vec<String>, ApiError> {
        let r = self.timed(op, || {
            let intent = self
                .store()
                .begin_intent(op, "", &dev.to_string(), Guards::Kernel)
                .map_err(failed)?;
            let r = f();
            let _ = self.store().end_intent(intent);
            r
        });
        let outcome = verdict(&r);
        let changed = r
            .as_ref()
            .map_or_else(|_| vec![dev.to_string()], Clone::clone);
        self.audit.record(uid, op, "", "", &changed, &outcome);
        r
    }
}
