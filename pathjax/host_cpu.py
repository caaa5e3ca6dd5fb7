"""This host's CPU as Linux describes it, for choices that depend on the microarchitecture."""


def first_cpu_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (vendor_id, cpu family, model, flags, ...);
    {} where there is none."""
    fields = {}
    try:
        with open('/proc/cpuinfo') as info:
            for line in info:
                if not line.strip():
                    break
                key, _, value = line.partition(':')
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields
