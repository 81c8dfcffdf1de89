{{/*
Labels shared by every object of the release. Call with the root context.
*/}}
{{- define "can-dra.labels" }}
    app.kubernetes.io/name: can-dra
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
    app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The checks of the admission policies on every can-dra opaque config (`variables.params`), as far
as CEL can express the rules of the api crate's MemberConfig; the node daemon still validates the
whole document. Call with the root context.
*/}}
{{- define "can-dra.memberConfigValidations" }}
    - expression: >-
        variables.params.all(p, type(p) == map)
      message: "can.dra.dev parameters: must be an object (a MemberConfig)"
    - expression: >-
        variables.params.all(p, has(p.apiVersion) && p.apiVersion == 'can.dra.dev/v1alpha1')
      message: "can.dra.dev parameters: apiVersion must be can.dra.dev/v1alpha1"
    - expression: >-
        variables.params.all(p, has(p.kind) && p.kind == 'MemberConfig')
      message: "can.dra.dev parameters: kind must be MemberConfig"
    - expression: >-
        variables.params.all(p, p.all(k, k in ['apiVersion', 'kind', 'interfaceName', 'access',
        'frameFormat', 'receiveFilters', 'transmitAllow', 'shaping']))
      message: "can.dra.dev parameters: unknown field (expected apiVersion, kind, interfaceName, access, frameFormat, receiveFilters, transmitAllow, shaping)"
    - expression: >-
        variables.params.all(p, !has(p.interfaceName) ||
        (type(p.interfaceName) == string && size(p.interfaceName) >= 1 && size(p.interfaceName) <= 15 &&
        p.interfaceName.matches('^[!-~]+$') && !p.interfaceName.matches('[/:%]') &&
        !(p.interfaceName in ['.', '..', 'lo'])))
      message: "can.dra.dev parameters: interfaceName must be 1 to 15 printable ASCII characters without '/', ':', '%' or whitespace, and not '.', '..' or 'lo'"
    - expression: >-
        variables.params.all(p, !has(p.interfaceName) || type(p.interfaceName) != string ||
        ['cdra', 'vxtm-', 'vxtt-'].all(r, !p.interfaceName.startsWith(r)))
      message: "can.dra.dev parameters: interfaceName must not start with cdra, vxtm- or vxtt-, which the driver reserves for its own links"
    - expression: >-
        variables.params.all(p, !has(p.access) || p.access in ['readWrite', 'listenOnly'])
      message: "can.dra.dev parameters: access must be readWrite or listenOnly"
    - expression: >-
        variables.params.all(p, !has(p.frameFormat) || p.frameFormat in ['classic', 'fd'])
      message: "can.dra.dev parameters: frameFormat must be classic or fd"
    - expression: >-
        variables.params.all(p, !has(p.transmitAllow) || type(p.transmitAllow) != list ||
        size(p.transmitAllow) > 0)
      message: "can.dra.dev parameters: transmitAllow must not be empty (use access: listenOnly for a member that never transmits)"
    - expression: >-
        variables.params.all(p, !has(p.transmitAllow) || !has(p.access) || p.access != 'listenOnly')
      message: "can.dra.dev parameters: transmitAllow cannot be combined with access: listenOnly"
    {{- template "can-dra.filterValidations" "receiveFilters" }}
    {{- template "can-dra.filterValidations" "transmitAllow" }}
    - expression: >-
        variables.params.all(p, !has(p.shaping) ||
        (type(p.shaping) == map && p.shaping.all(k, k in ['rx', 'tx'])))
      message: "can.dra.dev parameters: shaping may hold only rx and tx"
    - expression: >-
        variables.directions.all(d, type(d) == map && d.all(k, k in ['bitrate', 'dataBitrate',
        'delay', 'jitter', 'loss', 'duplicate']))
      message: "can.dra.dev parameters: shaping.rx and shaping.tx may hold only bitrate, dataBitrate, delay, jitter, loss, duplicate"
    - expression: >-
        variables.directions.all(d, ['bitrate', 'dataBitrate'].all(f, !(f in d) ||
        (type(d[f]) == int && d[f] > 0) ||
        (type(d[f]) == string && d[f].matches('^[0-9]+(\\.[0-9]+)?([kK]|M)?(bit|bps|bit/s)?$'))))
      message: "can.dra.dev parameters: shaping bitrate and dataBitrate must be bitrates such as 500k, 1M, 125kbit or 125000"
    - expression: >-
        variables.directions.all(d, !has(d.bitrate) || type(d.bitrate) != int ||
        (d.bitrate >= 1000 && d.bitrate <= 1000000))
      message: "can.dra.dev parameters: shaping bitrate must be from 1 kbit/s to 1 Mbit/s"
    - expression: >-
        variables.directions.all(d, !has(d.dataBitrate) || has(d.bitrate))
      message: "can.dra.dev parameters: shaping dataBitrate requires bitrate"
    - expression: >-
        variables.params.all(p, !has(p.frameFormat) || p.frameFormat != 'classic' || !has(p.shaping) ||
        ['rx', 'tx'].all(k, !(k in p.shaping) || !('dataBitrate' in p.shaping[k])))
      message: "can.dra.dev parameters: shaping dataBitrate has no effect with frameFormat: classic"
    - expression: >-
        variables.directions.all(d, ['delay', 'jitter'].all(f, !(f in d) ||
        (type(d[f]) == int && d[f] == 0) ||
        (type(d[f]) == string && d[f].matches('^(0|[0-9]+(\\.[0-9]+)?(s|ms|us|µs|ns))$'))))
      message: "can.dra.dev parameters: shaping delay and jitter must be time spans such as 10ms, 1.5ms, 250us or 1s"
    - expression: >-
        variables.directions.all(d, !has(d.delay) || type(d.delay) != string || d.delay == '0' ||
        duration(d.delay) <= duration('10s'))
      message: "can.dra.dev parameters: shaping delay must be at most 10s"
    - expression: >-
        variables.directions.all(d, !has(d.jitter) || (has(d.delay) &&
        (type(d.jitter) != string || d.jitter == '0' || (type(d.delay) == string && d.delay != '0' &&
        duration(d.jitter) <= duration(d.delay)))))
      message: "can.dra.dev parameters: shaping jitter requires delay and must not exceed it"
    - expression: >-
        variables.directions.all(d, !has(d.jitter) || type(d.jitter) != string || d.jitter == '0' ||
        duration(d.jitter) <= duration('2147483647ns'))
      message: "can.dra.dev parameters: shaping jitter must be at most 2.147483647s (netem's limit)"
    - expression: >-
        variables.directions.all(d, ['loss', 'duplicate'].all(f, !(f in d) ||
        (type(d[f]) == string && d[f].matches('^0*(100(\\.0+)?|[0-9]{1,2}(\\.[0-9]{1,4}0*)?)%$'))))
      message: "can.dra.dev parameters: shaping loss and duplicate must be percentages from 0% to 100% with at most 4 decimals, such as 0.5%"
{{- end }}

{{/*
Checks of one filter list of a MemberConfig; call with the field name (receiveFilters or
transmitAllow). A CAN id or mask is an integer or a decimal or 0x-hex string; it fits 11 bits
(0x7FF) unless the filter is extended, then 29 bits (0x1FFFFFFF).
*/}}
{{- define "can-dra.filterValidations" }}
    - expression: >-
        variables.params.all(p, !has(p.{{ . }}) ||
        (type(p.{{ . }}) == list && size(p.{{ . }}) <= 64))
      message: "can.dra.dev parameters: {{ . }} must be a list of at most 64 filters"
    - expression: >-
        variables.params.all(p, !has(p.{{ . }}) || type(p.{{ . }}) != list ||
        p.{{ . }}.all(f, type(f) == map && has(f.id) &&
        f.all(k, k in ['id', 'mask', 'extended', 'invert']) &&
        (!has(f.extended) || type(f.extended) == bool) && (!has(f.invert) || type(f.invert) == bool)))
      message: "can.dra.dev parameters: each {{ . }} entry needs id and may hold only id, mask, extended (bool), invert (bool)"
    - expression: >-
        variables.params.all(p, !has(p.{{ . }}) || type(p.{{ . }}) != list ||
        p.{{ . }}.all(f, type(f) != map || !has(f.id) ||
        (has(f.extended) && f.extended == true ?
          ((type(f.id) == int && f.id >= 0 && f.id <= 536870911) ||
           (type(f.id) == string && (f.id.matches('^0[xX]0*[01]?[0-9a-fA-F]{1,7}$') ||
            (f.id.matches('^0*[0-9]{1,9}$') && int(f.id) <= 536870911)))) :
          ((type(f.id) == int && f.id >= 0 && f.id <= 2047) ||
           (type(f.id) == string && (f.id.matches('^0[xX]0*[0-7]?[0-9a-fA-F]{1,2}$') ||
            (f.id.matches('^0*[0-9]{1,4}$') && int(f.id) <= 2047)))))))
      message: "can.dra.dev parameters: {{ . }}[].id must fit in 11 bits (0x7FF), or in 29 bits (0x1FFFFFFF) with extended: true"
    - expression: >-
        variables.params.all(p, !has(p.{{ . }}) || type(p.{{ . }}) != list ||
        p.{{ . }}.all(f, type(f) != map || !has(f.mask) ||
        (has(f.extended) && f.extended == true ?
          ((type(f.mask) == int && f.mask >= 0 && f.mask <= 536870911) ||
           (type(f.mask) == string && (f.mask.matches('^0[xX]0*[01]?[0-9a-fA-F]{1,7}$') ||
            (f.mask.matches('^0*[0-9]{1,9}$') && int(f.mask) <= 536870911)))) :
          ((type(f.mask) == int && f.mask >= 0 && f.mask <= 2047) ||
           (type(f.mask) == string && (f.mask.matches('^0[xX]0*[0-7]?[0-9a-fA-F]{1,2}$') ||
            (f.mask.matches('^0*[0-9]{1,4}$') && int(f.mask) <= 2047)))))))
      message: "can.dra.dev parameters: {{ . }}[].mask must fit in 11 bits (0x7FF), or in 29 bits (0x1FFFFFFF) with extended: true"
{{- end }}

{{/*
The policy variables derived from `variables.spec` (a ResourceClaimSpec): `params`, the parameters
of every opaque config for this driver, and `directions`, every shaping direction in them.
*/}}
{{- define "can-dra.paramVariables" }}
    - name: params
      expression: >-
        has(variables.spec.devices) && has(variables.spec.devices.config) ?
        variables.spec.devices.config.filter(c, has(c.opaque) &&
        c.opaque.driver == {{ .Values.driverName | quote }}).map(c, c.opaque.parameters) : []
    - name: directions
      expression: >-
        variables.params.filter(p, type(p) == map && has(p.shaping) && type(p.shaping) == map &&
        has(p.shaping.rx)).map(p, p.shaping.rx) +
        variables.params.filter(p, type(p) == map && has(p.shaping) && type(p.shaping) == map &&
        has(p.shaping.tx)).map(p, p.shaping.tx)
{{- end }}
