//! The migration service: an mdev's device state moved between two daemons over
//! mutual TLS, for devices no VMM holds (a VMM migrates what it holds itself).

use std::net::TcpListener;

use mediated_dev::host::read_mdev;
use mediated_dev::migration::tls::Tls;
use mediated_dev::migration::{self as mig, net, MigrationDevice, VfioMigration};
use mediated_dev::{Mdev, MdevTypeId};
use uuid::Uuid;
use vf_provisioner::Op;

use super::mediated::{uuid_arg, MdevIntent};
use super::{failed, Migration};
use crate::api::ids::Endpoint;
use crate::api::{ApiError, MigrationInfo, MigrationStats};
use crate::daemon::store::Guards;

impl Migration<'_> {
    /// An mdev this daemon may migrate: active, and not held by a VMM (which then
    /// drives the migration itself).
    fn migratable(&self, uuid: &str) -> Result<(Mdev, VfioMigration, mig::Header), ApiError> {
        let u = uuid_arg(uuid)?;
        let m = read_mdev(&self.sys, &u).ok_or(mediated_dev::Error::NoMdev(u))?;
        self.gate_mdev(Op::Migrate, &u.to_string())
            .map_err(|r| ApiError::Refused(r.to_string()))?;
        let path = self
            .sys
            .root()
            .join(m.sysfs_path.strip_prefix("/").unwrap_or(&m.sysfs_path));
        let dev = VfioMigration::open(&path, uuid)?;
        let header = mig::mdev_header(&self.sys, &m);
        Ok((m, dev, header))
    }

    /// Preflight: whether an mdev can migrate now, and as what.
    pub fn migration_check(&self, uuid: &str) -> Result<MigrationInfo, ApiError> {
        let (m, dev, header) = self.migratable(uuid)?;
        let flags = mig::check(&dev)?;
        Ok(MigrationInfo {
            uuid: m.uuid.to_string(),
            type_id: m.type_id.to_string(),
            driver: header.driver,
            driver_version: header.driver_version,
            flags,
            features: mig::state::flag_names(flags),
        })
    }

    /// Sends an mdev's state to a destination daemon's endpoint. On success the
    /// source is left stopped; on any failure it runs again.
    pub fn migrate_out(
        &self,
        uuid: &str,
        endpoint: &str,
        one_time: Option<&str>,
        uid: u32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<MigrationStats, ApiError> {
        let r = self.timed("migrate-out", || {
            let to = Endpoint::new(endpoint)?;
            let tls = match one_time {
                Some(bundle) => Tls::from_one_time(bundle)?,
                None => self.migration_tls()?,
            };
            let _claim = self.claims.wait(vec![uuid.to_string()]);
            let (_, dev, header) = self.migratable(uuid)?;
            // What the stop will carry, for the progress's expected downtime.
            let expected = dev.data_size().unwrap_or(0);
            let header = mig::Header {
                size_hint: expected,
                ..header
            };
            let report = &mut |sent| progress(sent, expected);
            let (_, stats) = net::send_with_progress(&dev, &header, to.as_str(), &tls, report)?;
            Ok(MigrationStats {
                bytes: stats.bytes,
                precopy_bytes: stats.precopy_bytes,
                downtime_us: stats.stopped_for.as_micros() as u64,
                history: stats.history,
            })
        });
        let outcome = super::verdict(&r);
        self.audit.record(
            uid,
            "migrate-out",
            "",
            endpoint,
            &[uuid.to_string()],
            &outcome,
        );
        r
    }

    /// Reserves the destination mdev `uuid` (creating it as `type_id` if absent) and
    /// listens on `listen` for one source. Returns the endpoint and the work that
    /// receives the state (run it on a thread); a failed receive leaves the device
    /// reset, or removes it if it was created for this migration.
    pub fn prepare_incoming(
        &self,
        uuid: &str,
        type_id: &str,
        listen: &str,
        one_time: bool,
        uid: u32,
    ) -> Result<(Prepared, Incoming), ApiError> {
        let u = uuid_arg(uuid)?;
        let listen = Endpoint::new(listen)?;
        if !type_id.is_empty() {
            MdevTypeId::new(type_id)?;
        }
        let existing = read_mdev(&self.sys, &u);
        let created = existing.is_none();
        if created && type_id.is_empty() {
            return Err(ApiError::BadInput(format!(
                "mdev {u}: it does not exist here; give the type to create it as"
            )));
        }
        let (tls, bundle) = match one_time {
            true => {
                let (tls, bundle) = Tls::one_time()?;
                (tls, Some(bundle))
            }
            false => (self.migration_tls()?, None),
        };
        if let Some(m) = &existing {
            if !type_id.is_empty() && m.type_id != type_id {
                return Err(ApiError::Refused(format!(
                    "mdev {u}: it exists here as {}, not {type_id}; remove it or migrate into another UUID",
                    m.type_id
                )));
            }
        } else {
            self.make_one(u, type_id)?;
        }
        let ready = (|| {
            let (_, dev, header) = self.migratable(uuid)?;
            mig::check(&dev)?;
            let listener = TcpListener::bind(listen.as_str()).map_err(|e| {
                ApiError::BadInput(format!(
                    "mdev {u}: cannot listen on {listen:?}: {e}; give a free HOST:PORT (port 0 picks one)"
                ))
            })?;
            let endpoint = listener.local_addr().map_err(failed)?.to_string();
            Ok((endpoint, dev, header, listener))
        })();
        let (endpoint, dev, header, listener) = match ready {
            Ok(r) => r,
            Err(e) => {
                if created {
                    let _ = self.mediator().remove(&u);
                }
                return Err(e);
            }
        };
        let body = serde_json::to_string(&MdevIntent {
            uuid: u,
            remove_mdev: created,
            remove_definition: false,
        })
        .expect("serializes");
        let intent = self
            .store()
            .begin_intent("mdev-incoming", "", &body, Guards::Kernel)
            .map_err(failed)?;
        self.audit.record(
            uid,
            "prepare-incoming",
            "",
            &endpoint,
            &[u.to_string()],
            "ok",
        );
        Ok((
            Prepared { endpoint, bundle },
            Incoming {
                uuid: u,
                tls,
                created,
                intent,
                dev,
                header,
                listener,
            },
        ))
    }

    /// The migration stream's TLS credentials, read from the configured files for
    /// each migration (a renewed certificate needs no restart).
    fn migration_tls(&self) -> Result<Tls, ApiError> {
        Ok(Tls::from_files(&self.config().migration.tls)?)
    }

    /// Receives an incoming migration prepared by [`Core::prepare_incoming`].
    pub fn receive(&self, inc: Incoming) -> Result<MigrationStats, ApiError> {
        let r = self.timed("migrate-in", || {
            let _claim = self.claims.wait(vec![inc.uuid.to_string()]);
            let limits = &self.config().migration.limits;
            Ok(net::receive(
                &inc.dev,
                &inc.header,
                &inc.listener,
                &inc.tls,
                limits,
            )?)
        });
        drop(inc.dev);
        if r.is_err() && inc.created {
            let _ = self.mediator().remove(&inc.uuid);
        }
        let _ = self.store().end_intent(inc.intent);
        r.map(|s| MigrationStats {
            bytes: s.bytes,
            precopy_bytes: 0,
            downtime_us: s.stopped_for.as_micros() as u64,
            history: s.history,
        })
    }
}

/// What a destination tells its orchestrator: where the source sends, and with
/// one-time credentials, the source's bundle (a secret: it is the source's key).
pub struct Prepared {
    pub endpoint: String,
    pub bundle: Option<String>,
}

/// A destination waiting for its source.
pub struct Incoming {
    pub uuid: Uuid,
    tls: Tls,
    created: bool,
    intent: i64,
    dev: VfioMigration,
    header: mig::Header,
    listener: TcpListener,
}
