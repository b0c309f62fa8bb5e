"""Keeping what was received: durable instance files (`storage`), their rows (`catalog`), the
database (`db`: models, migrations, engines, group commit), the one leased-queue machinery every
queue uses (`leased`), and retention. A floor: it imports no step of the flow."""
