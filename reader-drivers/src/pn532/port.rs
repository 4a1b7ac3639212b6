//! Serial ports for the serial drivers (PN532 and line readers): opening one the way both
//! need it, waiting between attempts, and listing the ports an operator can configure.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_serial::{ClearBuffer, SerialPort, SerialPortBuilderExt, SerialPortType, SerialStream};

/// Why a serial device could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortError {
    /// The device file does not exist (unplugged, or re-enumerating).
    #[error("the serial device {} does not exist (unplugged?)", path.display())]
    Missing {
        /// The configured path.
        path: PathBuf,
    },
    /// It exists but cannot be opened or set up.
    #[error("cannot open the serial device {}: {source}", path.display())]
    Open {
        /// The configured path.
        path: PathBuf,
        /// What the system said.
        source: tokio_serial::Error,
    },
}

/// Opens `path` at `baud`, 8N1, no flow control, exclusively, and drops whatever was
/// waiting in its input buffer (leftovers from before we opened it are not answers to us).
pub fn open(path: &Path, baud: u32) -> Result<SerialStream, PortError> {
    if !path.exists() {
        return Err(PortError::Missing {
            path: path.to_path_buf(),
        });
    }
    let open_error = |source| PortError::Open {
        path: path.to_path_buf(),
        source,
    };
    let port = tokio_serial::new(path.to_string_lossy(), baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(tokio_serial::Parity::None)
        .stop_bits(tokio_serial::StopBits::One)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(open_error)?;
    port.clear(ClearBuffer::Input).map_err(open_error)?;
    Ok(port)
}

/// The serial ports on this machine that a `pn532` or `line` reader can use, one line
/// each: the path to put in the configuration and what the system knows about the device.
/// Stable `/dev/serial/by-id/…` names (which survive re-enumeration) follow the device they
/// point to.
pub fn list_ports() -> Vec<String> {
    let mut ports = tokio_serial::available_ports().unwrap_or_default();
    ports.sort_by(|a, b| a.port_name.cmp(&b.port_name));
    let by_id: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/dev/serial/by-id")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let link = e.path();
                    let target = std::fs::canonicalize(&link).ok()?;
                    Some((link, target))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut lines = Vec::new();
    for p in ports {
        let what = match &p.port_type {
            SerialPortType::UsbPort(usb) => {
                let mut s = format!("USB {:04x}:{:04x}", usb.vid, usb.pid);
                for part in [&usb.manufacturer, &usb.product].into_iter().flatten() {
                    s.push(' ');
                    s.push_str(part);
                }
                s
            }
            SerialPortType::PciPort => "PCI".to_string(),
            SerialPortType::BluetoothPort => "Bluetooth".to_string(),
            SerialPortType::Unknown => "serial".to_string(),
        };
        lines.push(format!("{} ({what})", p.port_name));
        for (link, _) in by_id
            .iter()
            .filter(|(_, target)| *target == Path::new(&p.port_name))
        {
            lines.push(format!("  also {}", link.display()));
        }
    }
    lines
}

/// Growing waits between attempts: `first`, doubling, at most `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            next: first,
            max,
        }
    }

    /// The next wait.
    pub(crate) fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Back to the first wait (after a success).
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(500));
        let waits: Vec<_> = (0..5).map(|_| b.next_wait()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        b.reset();
        assert_eq!(b.next_wait(), ms(100));
    }

    #[test]
    fn listed_ports_are_devices_that_exist() {
        for line in list_ports() {
            let path = line
                .trim_start()
                .trim_start_matches("also ")
                .split(' ')
                .next()
                .unwrap_or("");
            assert!(
                path.starts_with("/dev/") && Path::new(path).exists(),
                "{line}"
            );
        }
    }

    #[tokio::test]
    async fn opening_a_missing_device_says_it_is_missing() {
        let dir = std::env::temp_dir().join(format!("id06-no-such-tty-{}", std::process::id()));
        match open(&dir, 9600) {
            Err(PortError::Missing { path }) => assert_eq!(path, dir),
            other => panic!("expected Missing, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_tty_cannot_be_opened() {
        let file = std::env::temp_dir().join(format!("id06-not-a-tty-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let result = open(&file, 9600);
        let _ = std::fs::remove_file(&file);
        assert!(matches!(result, Err(PortError::Open { .. })), "{result:?}");
    }
}
