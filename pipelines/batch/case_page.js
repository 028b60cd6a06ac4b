// A case page's viewer (pipelines/batch/case_page.py): NiiVue from ../_viewer/, the images inline in
// #case-data. The study's image with the mask overlaid, the sequence chosen among its inputs; views,
// window, overlay opacity and a toggle per label; for a follow-up the prior study, registered onto this
// one, in a second viewer whose slice follows this one's. State for tests: body[data-ready], and the
// viewers as window.viewers.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("case-data").textContent);
  var status = document.getElementById("viewer-status");
  function byId(id) { return document.getElementById(id); }
  function load(key) {
    return niivue.NVImage.loadFromBase64({base64: data.images[key], name: key + ".nii.gz"});
  }
  function lut(hidden) {
    var map = {R: [0], G: [0], B: [0], A: [0], I: [0], labels: [""]};
    data.labels.forEach(function (label) {
      map.R.push(label.rgb[0]); map.G.push(label.rgb[1]); map.B.push(label.rgb[2]);
      map.A.push(hidden[label.value] ? 0 : 255); map.I.push(label.value); map.labels.push(label.name);
    });
    return map;
  }
  var lines = {R: [0, 255, 0], G: [0, 255, 255], B: [0, 255, 255], A: [0, 255, 255], I: [0, 1, 2],
               labels: ["", "RANO longest diameter", "RANO perpendicular diameter"]};
  async function viewer(canvas, imageKey, labelKey, diametersKey) {
    var nv = new niivue.Niivue({backColor: [0, 0, 0, 1], show3Dcrosshair: false, logLevel: "error",
                                dragAndDropEnabled: false, isRadiologicalConvention: true, crosshairWidth: 0.5});
    await nv.attachTo(canvas);
    var view = {nv: nv, image: await load(imageKey), labels: await load(labelKey), diameters: null};
    nv.addVolume(view.image);
    nv.addVolume(view.labels);
    view.labels.setColormapLabel(lut({}));
    view.labels.opacity = 0.5;
    if (diametersKey) {
      view.diameters = await load(diametersKey);
      nv.addVolume(view.diameters);
      view.diameters.setColormapLabel(lines);
    }
    nv.setSliceType(nv.sliceTypeAxial);
    nv.updateGLVolume();
    return view;
  }
  function goTo(views, mm) {  // a point in RAS mm: the prior is on this study's grid
    views.forEach(function (view) {
      view.nv.scene.crosshairPos = view.nv.mm2frac(mm);
      view.nv.drawScene();
      view.nv.createOnLocationChange();
    });
  }
  function showWindow(view) {
    byId("window-low").value = Math.round(view.image.cal_min * 10) / 10;
    byId("window-high").value = Math.round(view.image.cal_max * 10) / 10;
  }
  async function start() {
    var now = await viewer("viewer-now", data.sequences[0].key, "labels", data.diameters ? "diameters" : null);
    var views = [now];
    if (data.prior) {
      views.push(await viewer("viewer-prior", "prior", "prior_labels", null));
      now.nv.broadcastTo([views[1].nv], {"2d": true, "3d": true});
      views[1].nv.broadcastTo([now.nv], {"2d": true, "3d": true});
    }
    var images = {};
    images[data.sequences[0].key] = now.image;
    byId("sequence").addEventListener("change", async function (event) {
      var key = event.target.value;
      if (!images[key]) { images[key] = await load(key); }
      now.nv.removeVolume(now.image);
      now.image = images[key];
      now.nv.addVolume(now.image);
      now.nv.setVolume(now.image, 0);
      now.nv.updateGLVolume();
      showWindow(now);
      document.body.setAttribute("data-sequence", key);
    });
    document.querySelectorAll("button[data-view]").forEach(function (button) {
      button.addEventListener("click", function () {
        views.forEach(function (view) { view.nv.setSliceType(niivue.SLICE_TYPE[button.getAttribute("data-view")]); });
        document.body.setAttribute("data-view", button.getAttribute("data-view"));
      });
    });
    byId("opacity").addEventListener("input", function (event) {
      views.forEach(function (view) { view.labels.opacity = Number(event.target.value); view.nv.updateGLVolume(); });
    });
    var hidden = {};
    document.querySelectorAll("input[data-label]").forEach(function (box) {
      box.addEventListener("change", function () {
        hidden[box.getAttribute("data-label")] = !box.checked;
        views.forEach(function (view) { view.labels.setColormapLabel(lut(hidden)); view.nv.updateGLVolume(); });
      });
    });
    var diameters = byId("diameters");
    if (diameters) {
      diameters.addEventListener("change", function () {
        now.diameters.opacity = diameters.checked ? 1 : 0;
        now.nv.updateGLVolume();
      });
    }
    ["window-low", "window-high"].forEach(function (id) {
      byId(id).addEventListener("change", function () {
        var low = Number(byId("window-low").value), high = Number(byId("window-high").value);
        if (!(high > low)) { showWindow(now); return; }
        now.image.cal_min = low; now.image.cal_max = high;
        now.nv.updateGLVolume();
      });
    });
    now.nv.onIntensityChange = function () { showWindow(now); };
    now.nv.onLocationChange = function (where) {
      status.textContent = "voxel " + where.vox.join(", ") + " (" + Array.from(where.mm).slice(0, 3).map(function (v) {
        return v.toFixed(1); }).join(", ") + " mm RAS)";
      document.body.setAttribute("data-voxel", where.vox.join(","));
    };
    document.querySelectorAll("[data-goto]").forEach(function (link) {
      link.addEventListener("click", function (event) {
        event.preventDefault();
        goTo(views, JSON.parse(link.getAttribute("data-goto")));
      });
    });
    showWindow(now);
    goTo(views, data.start);
    window.viewers = views;
    document.body.setAttribute("data-ready", "yes");
  }
  if (typeof niivue === "undefined") {
    status.textContent = "The viewer (../_viewer/niivue.umd.js) did not load: keep this page in its run's output folder.";
    document.body.setAttribute("data-ready", "no viewer");
    return;
  }
  start().catch(function (error) {
    status.textContent = "The viewer failed: " + error;
    document.body.setAttribute("data-ready", "failed");
    throw error;
  });
})();
