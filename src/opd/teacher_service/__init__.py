"""The teacher as a service: `opd serve-teacher` (`server`), its JSON wire format
(`protocol`) and the client every verb scores through (`client`)."""
