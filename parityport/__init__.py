"""The command-line front door: `parityport convert | parity | eval | verify | publish | catalog`."""
