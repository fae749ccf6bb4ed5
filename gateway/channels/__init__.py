"""Pure rules of each approved flow: field formats, the photo check, channel policy."""
